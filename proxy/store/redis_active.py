"""Which groups the expiry sweep visits: those noted active lately.

A group with a new hold is noted in the sorted set ``<prefix>:activegroups`` (scored by
this host's clock), at most once a minute per process and off the request path; its
replica notes it again at every renewal. The sweep visits only groups noted within
the window, so its cost follows the holds open, not the number of keys ever made.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

# A group noted active is swept for this long after it was last noted; its replica
# notes it again every third of a lease while it holds money there.
ACTIVE_WINDOW_MS = 10 * 60 * 1000
# Well inside the window: a call (at most ~400 s) ends before its group's note does,
# and its replica notes the group again at every renewal anyway.
NOTE_AGAIN_SECONDS = 60.0
NOTED_MOST = 100_000


class ActiveGroups:
    def __init__(self, client: Any, prefix: str) -> None:
        self.r = client
        self.key = f"{prefix}:activegroups"
        self._noted: dict[str, float] = {}  # group -> when to note it active again
        self._noting: set[asyncio.Future[None]] = set()

    async def mark(self, groups: list[str]) -> None:
        if not groups:
            return
        if len(self._noted) > NOTED_MOST:
            self._noted.clear()
        until = time.monotonic() + NOTE_AGAIN_SECONDS
        self._noted.update(dict.fromkeys(groups, until))
        # This host's clock: skew between replicas is far inside the window.
        now_ms = int(time.time() * 1000)
        await self.r.zadd(self.key, dict.fromkeys(groups, now_ms))

    def note(self, group: str) -> None:
        """Note a group with a new hold, unless noted within the minute. The hold stands
        whether or not this lands: its own key's next reserve sweeps it, and its replica
        notes it at every renewal."""
        if self._noted.get(group, 0.0) >= time.monotonic():
            return
        self._noted[group] = time.monotonic() + NOTE_AGAIN_SECONDS
        task = asyncio.ensure_future(self.mark([group]))
        self._noting.add(task)
        task.add_done_callback(self._noted_done)

    def _noted_done(self, task: asyncio.Future[None]) -> None:
        self._noting.discard(task)
        if not task.cancelled():
            task.exception()  # a store error here is retried by the next renewal

    async def groups(self) -> list[str]:
        """Groups noted active lately; older notes are dropped (their holds, if any,
        were past their deadline and swept long before)."""
        since = int(time.time() * 1000) - ACTIVE_WINDOW_MS
        await self.r.zremrangebyscore(self.key, "-inf", f"({since}")
        groups: list[str] = await self.r.zrange(self.key, 0, -1)
        return groups

    async def forget(self, group: str) -> None:
        """A group with no hold left to sweep; a note on its way lands first."""
        await asyncio.gather(*self._noting, return_exceptions=True)
        self._noted.pop(group, None)
        await self.r.zrem(self.key, group)

    async def close(self) -> None:
        for task in list(self._noting):
            task.cancel()
        await asyncio.gather(*self._noting, return_exceptions=True)
