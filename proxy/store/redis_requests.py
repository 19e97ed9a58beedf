"""The per-request log on Redis: one stream, ``<prefix>:requests``.

Each record is one entry (``XADD ... MAXLEN ~ cap``: Redis trims whole nodes of the
stream, so it keeps the cap and up to a node's worth more, ``stream-node-max-entries``,
100 by default). A batch of records is one pipelined round trip. Pages are read
newest first with ``XREVRANGE``; the cursor is the id of the last entry a page looked
at. The stream is one key, so on a cluster it lives in one slot, like any key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .requests import BadCursor, Pager, RequestRecord

_ENTRY_ID = re.compile(r"^([0-9]{1,20})-([0-9]{1,20})$")
_MAX_SEQUENCE = 2**64 - 1


class RequestStream:
    def __init__(self, client: Any, prefix: str, cap: int) -> None:
        self.r = client
        self.key = f"{prefix}:requests"
        self.cap = cap

    async def append(self, records: Sequence[RequestRecord]) -> None:
        if not records:
            return
        async with self.r.pipeline(transaction=False) as pipe:
            for record in records:
                pipe.xadd(self.key, _fields(record), maxlen=self.cap, approximate=True)
            await pipe.execute()

    async def page(
        self, key: str | None, team: str | None, limit: int, cursor: str | None
    ) -> tuple[list[RequestRecord], str | None]:
        end = "+" if cursor is None else _before(cursor)
        pager = Pager(key, team, limit)
        while end is not None:
            count = pager.reach()
            entries = await self.r.xrevrange(self.key, max=end, min="-", count=count)
            for entry_id, fields in entries:
                if not pager.take(entry_id, _record(fields)):
                    return pager.page()
            if len(entries) < count:
                break  # the oldest entry was read
            end = _before(entries[-1][0])
        return pager.page()


def _fields(record: RequestRecord) -> dict[str, str | int]:
    return {
        "time": f"{record.time:.3f}",
        "request_id": record.request_id,
        "key_id": record.key_id,
        "team": record.team or "",
        "model": record.model,
        "size": record.size or "",
        "images": record.images,
        "cost_micros": record.cost_micros,
        "outcome": record.outcome,
    }


def _record(fields: dict[str, str]) -> RequestRecord | None:
    """An entry's record; None for an entry this proxy did not write."""
    try:
        return RequestRecord(
            time=float(fields["time"]),
            request_id=fields["request_id"],
            key_id=fields["key_id"],
            team=fields["team"] or None,
            model=fields["model"],
            size=fields["size"] or None,
            images=int(fields["images"]),
            cost_micros=int(fields["cost_micros"]),
            outcome=fields["outcome"],
        )
    except (KeyError, ValueError):
        return None


def _before(entry_id: str) -> str | None:
    """The greatest entry id below ``entry_id`` (None: there is none), for an
    ``XREVRANGE`` that leaves the entry itself out on any Redis version."""
    match = _ENTRY_ID.match(entry_id)
    if match is None:
        raise BadCursor(entry_id)
    millis, sequence = int(match[1]), int(match[2])
    if millis > _MAX_SEQUENCE or sequence > _MAX_SEQUENCE:
        raise BadCursor(entry_id)
    if sequence:
        return f"{millis}-{sequence - 1}"
    return f"{millis - 1}-{_MAX_SEQUENCE}" if millis else None
