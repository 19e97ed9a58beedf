"""The per-request log's writer: records leave the request path at once.

A call that held money hands its record to ``RequestLog.add`` as it ends: a
bounded in-process queue, nothing awaited. One background task writes the queue to
the store in batches (one pipelined round trip each). The log is a record of what
happened, not the ledger: when the queue is full, or a batch cannot be written in
the store's time bound, its records are dropped and counted in
``apiyi_proxy_request_log_dropped_total``; a call is never slower, and never fails,
because of the log. On shutdown the queue gets a short last chance to be written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from .config import StoreSettings
from .metrics import Metrics
from .store import RequestRecord, Store

log = logging.getLogger("apiyi_proxy.request_log")

QUEUE_MAX = 10_000  # records waiting to be written; past it, new ones are dropped
BATCH = 256  # records written at once
WARN_EVERY_SECONDS = 60.0  # a failing store is reported this often, not per batch


class RequestLog:
    def __init__(self, store: Store, settings: StoreSettings, metrics: Metrics) -> None:
        self.enabled = settings.request_log_cap > 0
        self._store = store
        self._timeout = settings.timeout_seconds
        self._dropped = metrics.request_log_dropped
        self._queue: deque[RequestRecord] = deque()
        self._ready = asyncio.Event()
        self._closing_at: float | None = None  # once stopping: no batch starts past it
        self._task: asyncio.Task[None] | None = None
        self._warned = -WARN_EVERY_SECONDS

    def add(self, record: RequestRecord) -> None:
        """Queue ``record`` for the store; never waits, never raises."""
        if not self.enabled:
            return
        if len(self._queue) >= QUEUE_MAX:
            self._dropped.inc()
            return
        self._queue.append(record)
        self._ready.set()

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._write_forever())

    async def _write_forever(self) -> None:
        while True:
            closing_at = self._closing_at
            if closing_at is not None and (not self._queue or time.monotonic() >= closing_at):
                return
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            await self._write(BATCH)

    async def _write(self, most: int) -> None:
        batch = [self._queue.popleft() for _ in range(min(most, len(self._queue)))]
        try:
            if self._store.in_process:
                await self._store.append_requests(batch)
            else:
                async with asyncio.timeout(self._timeout):
                    await self._store.append_requests(batch)
        except asyncio.CancelledError:
            self._dropped.inc(len(batch))
            raise
        except Exception as exc:  # the writer outlives whatever one batch met
            # Past the time bound the batch may still land; it is counted as dropped.
            self._dropped.inc(len(batch))
            now = time.monotonic()
            if now - self._warned >= WARN_EVERY_SECONDS:
                self._warned = now
                log.warning(
                    "request log: %d records not written (%s); calls go on, the log misses them",
                    len(batch),
                    type(exc).__name__,
                )

    async def stop(self, grace: float = 2.0) -> None:
        """Write what is queued, starting batches for ``grace`` seconds at most (the
        last one ends within the store's time bound); drop the rest."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing_at = time.monotonic() + grace
        self._ready.set()
        done, _ = await asyncio.wait({task}, timeout=grace + self._timeout)
        if not done:
            # Bounded either way: a client that ignores the cancellation still gives up
            # at its own socket timeout, the store's time bound.
            task.cancel()
            await asyncio.wait({task}, timeout=self._timeout)
        if self._queue:
            self._dropped.inc(len(self._queue))
            log.warning("request log: %d records not written at shutdown", len(self._queue))
            self._queue.clear()
