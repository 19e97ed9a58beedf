"""The per-request log's records, and how one page of them is read.

Every call that held money leaves one ``RequestRecord`` (SPEC section 10), kept in a
bounded log in the store, newest first. A page is read from the newest record, or
from before an opaque cursor the store handed out, and looks at no more than
``SCAN_FACTOR`` records per record asked for: a filter that matches little never
reads the whole log in one call, it answers a short page and a cursor to go on from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..money import usd_text

# A page looks at no more than this many records per record asked for.
SCAN_FACTOR = 10
# Records read at a time when a filter leaves the page's need unknown.
SCAN_BATCH = 500
CSV_FIELDS = (
    "time", "request_id", "key_id", "team", "model", "size", "images", "cost_usd", "outcome",
)  # fmt: skip


class BadCursor(ValueError):
    """A cursor the log never handed out."""


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One call that held money, as the per-request log keeps it."""

    time: float  # unix seconds, when the call ended
    request_id: str  # the x-request-id its client got
    key_id: str
    team: str | None
    model: str
    size: str | None  # as sent upstream; None when the client named none
    images: int  # images the upstream billed (answered with a 200)
    cost_micros: int  # spend kept, the uncertain part included
    outcome: str  # the hold's resolution: settled, released or uncertain

    @property
    def iso_time(self) -> str:
        millis = int(self.time * 1000) % 1000
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.time)) + f".{millis:03d}Z"

    def public(self) -> dict[str, Any]:
        """What ``GET /admin/requests`` shows."""
        return {
            "time": self.iso_time,
            "request_id": self.request_id,
            "key_id": self.key_id,
            "team": self.team,
            "model": self.model,
            "size": self.size,
            "images": self.images,
            "cost_usd": self.cost_micros / 1e6,
            "outcome": self.outcome,
        }

    def csv_row(self) -> tuple[str, ...]:
        """The CSV columns of ``CSV_FIELDS``; the cost is exact decimal text."""
        cost = usd_text(self.cost_micros)
        return (
            self.iso_time,
            self.request_id,
            self.key_id,
            self.team or "",
            self.model,
            self.size or "",
            str(self.images),
            cost,
            self.outcome,
        )

    def matches(self, key: str | None, team: str | None) -> bool:
        return (key is None or self.key_id == key) and (team is None or self.team == team)


class Pager:
    """One page of the log, collected from its records read newest first."""

    def __init__(self, key: str | None, team: str | None, limit: int) -> None:
        self.key = key
        self.team = team
        self.limit = limit
        self.found: list[RequestRecord] = []
        self._left = limit * SCAN_FACTOR  # records this page may still look at
        self._cursor: str | None = None  # that of the last record looked at
        self._more = False

    def take(self, cursor: str, record: RequestRecord | None) -> bool:
        """Look at the next older record (None: one that could not be read); False
        once the page is complete, this record left for the next one."""
        if len(self.found) == self.limit or self._left == 0:
            self._more = True
            return False
        self._left -= 1
        self._cursor = cursor
        if record is not None and record.matches(self.key, self.team):
            self.found.append(record)
        return True

    def reach(self) -> int:
        """How many more records to read at once: those the page may still need, and
        one beyond them, to know whether anything older is left."""
        if self.key is None and self.team is None:
            need = self.limit - len(self.found)
        else:
            need = SCAN_BATCH
        return min(need, self._left) + 1

    def page(self) -> tuple[list[RequestRecord], str | None]:
        """The records found, and the cursor of the next page (None: nothing older)."""
        return self.found, self._cursor if self._more else None
