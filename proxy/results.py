"""Replay bodies of idempotent calls, where they can never crowd out the ledger.

A finished image answer can be 20 MB; it must never evict or block a budget write.
Bodies live where ``store.replay_url`` says: beside a shared ledger by default (so
every replica can replay them), on local disk for a ``memory://`` ledger, or in a
Redis of their own. Either way each body is capped (``results_max_bytes``), expires
with its idempotency record and counts against a total (``results_total_bytes``);
the oldest are dropped first to make room. Bodies are captured to a temporary file
while they stream, so memory per response stays bounded.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import IO, Any

from .config import StoreSettings

CHUNK = 256 * 1024
# Just under 256 KiB: Redis keeps each chunk in one allocation with a few bytes of
# header, and a full 256 KiB one would take jemalloc's next size class (320 KiB).
REDIS_CHUNK = CHUNK - 1024


class Capture:
    """The bytes of one answer, spooled to disk as they are sent."""

    def __init__(self, limit: int) -> None:
        self._file: IO[bytes] | None = None  # opened on the first byte
        self._discarded = False
        self.size = 0
        self._limit = limit

    def write(self, chunk: bytes) -> None:
        if self._discarded:
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile()
        self.size += len(chunk)
        if self.size > self._limit:
            # Too large to keep for replay: stop paying for the copy.
            self.discard()
            return
        self._file.write(chunk)

    @property
    def complete(self) -> bool:
        return self._file is not None  # discarding closes it

    def chunks(self, size: int = CHUNK) -> AsyncIterator[bytes]:
        assert self._file is not None
        file = self._file
        file.flush()

        async def read() -> AsyncIterator[bytes]:
            offset = 0
            while chunk := os.pread(file.fileno(), size, offset):
                offset += len(chunk)
                yield chunk

        return read()

    def copy_to(self, path: str) -> None:
        assert self._file is not None
        self._file.flush()
        self._file.seek(0)
        with open(path, "wb") as out:
            shutil.copyfileobj(self._file, out, CHUNK)

    def discard(self) -> None:
        self._discarded = True
        if self._file is not None:
            self._file.close()
            self._file = None


class ResultStore(abc.ABC):
    @abc.abstractmethod
    async def put(self, result_id: str, capture: Capture, ttl_seconds: float) -> bool: ...

    @abc.abstractmethod
    async def get(self, result_id: str) -> AsyncIterator[bytes] | None: ...

    async def close(self) -> None:  # noqa: B027 - nothing to close for some backends
        pass


def open_results(settings: StoreSettings) -> ResultStore:
    if settings.replay_url.startswith("memory"):
        return DiskResults(settings.results_total_bytes)
    return RedisResults(settings)


class DiskResults(ResultStore):
    def __init__(self, total_bytes: int) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="apiyi-results-")
        self._total = total_bytes
        self._used = 0
        self._entries: OrderedDict[str, tuple[str, int, float]] = OrderedDict()

    async def put(self, result_id: str, capture: Capture, ttl_seconds: float) -> bool:
        if not capture.complete or capture.size > self._total:
            return False
        path = os.path.join(self._dir.name, result_id.replace("/", "_"))
        await asyncio.to_thread(capture.copy_to, path)
        self._entries[result_id] = (path, capture.size, time.monotonic() + ttl_seconds)
        self._used += capture.size
        while self._used > self._total and self._entries:
            self._drop(next(iter(self._entries)))
        return result_id in self._entries

    async def get(self, result_id: str) -> AsyncIterator[bytes] | None:
        entry = self._entries.get(result_id)
        if entry is None:
            return None
        if entry[2] <= time.monotonic():
            self._drop(result_id)
            return None
        try:
            fd = os.open(entry[0], os.O_RDONLY)
        except OSError:
            return None

        async def read() -> AsyncIterator[bytes]:
            try:
                offset = 0
                while chunk := os.pread(fd, CHUNK, offset):
                    offset += len(chunk)
                    yield chunk
            finally:
                os.close(fd)

        return read()

    def _drop(self, result_id: str) -> None:
        path, size, _ = self._entries.pop(result_id)
        self._used -= size
        try:
            os.unlink(path)
        except OSError:
            pass

    async def close(self) -> None:
        self._dir.cleanup()


class RedisResults(ResultStore):
    """Replay bodies in Redis, reachable from every replica.

    All under one hash tag, so one script sees them all, on a cluster too::

        apiyi:{res}:sizes      hash    body id -> bytes reserved
        apiyi:{res}:expiry     zset    body id -> expiry (ms)
        apiyi:{res}:order      zset    body id -> when stored (oldest dropped first)
        apiyi:{res}:used       string  bytes reserved, never above results_total_bytes
        apiyi:{res}:part:<id>  list    a body being written
        apiyi:{res}:body:<id>  list    a complete body, renamed from part:<id>

    Room is reserved before the first chunk is written and every chunk is checked
    against its reservation (``proxy/lua/results_*.lua``), so in the ledger's own
    Redis the bodies never take more than the cap.
    """

    def __init__(self, settings: StoreSettings) -> None:
        from .store.redis_client import connect, load_script

        self._client: Any = connect(settings.replay_url, settings, decode=False)
        self._base = f"{settings.key_prefix}:{{res}}:"
        self._total = settings.results_total_bytes
        self._reserve = self._client.register_script(load_script("results_reserve"))
        self._write = self._client.register_script(load_script("results_write"))
        self._drop = self._client.register_script(load_script("results_drop"))

    async def put(self, result_id: str, capture: Capture, ttl_seconds: float) -> bool:
        from redis.exceptions import RedisError

        if not capture.complete or not 0 < capture.size <= self._total:
            return False
        base, ttl = self._base, int(ttl_seconds * 1000)
        try:
            args = [base, result_id, capture.size, ttl, self._total]
            if not await self._reserve(keys=[base + "sizes"], args=args):
                return False
            if await self._write_body(result_id, capture):
                return True
        except (RedisError, OSError):
            pass
        # Give the room back now rather than at the body's expiry, up to a day away;
        # if even this fails, the next reservation reclaims it once expired.
        with contextlib.suppress(RedisError, OSError):
            await self._drop(keys=[base + "sizes"], args=[base, result_id])
        return False

    async def _write_body(self, result_id: str, capture: Capture) -> bool:
        part = f"{self._base}part:{result_id}"
        written = 0
        async for chunk in capture.chunks(REDIS_CHUNK):
            written += len(chunk)
            last = "1" if written >= capture.size else "0"
            args = [self._base, result_id, chunk, last]
            if not await self._write(keys=[part], args=args):
                return False  # dropped to make room for newer bodies
        return written == capture.size

    async def get(self, result_id: str) -> AsyncIterator[bytes] | None:
        from redis.exceptions import RedisError

        key = f"{self._base}body:{result_id}"
        try:
            count = int(await self._client.llen(key))
        except (RedisError, OSError):
            return None
        if count == 0:
            return None

        async def read() -> AsyncIterator[bytes]:
            for index in range(count):
                chunk = await self._client.lindex(key, index)
                if chunk is None:
                    raise RuntimeError("replay body dropped while it was being sent")
                yield chunk

        return read()

    async def close(self) -> None:
        await self._client.aclose()
