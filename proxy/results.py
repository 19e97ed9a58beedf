"""Replay bodies of idempotent calls, kept apart from the ledger.

A finished image answer can be 20 MB; it must never evict or block a budget write,
so replay bodies live in their own store (``store.replay_url``): local disk for a
``memory://`` ledger, bounded in total size, oldest dropped first; a Redis (beside a
shared ledger by default, or an instance of its own with ``allkeys-lru``) shares them
across replicas. Bodies are captured to a temporary file while they stream, so memory per
response stays bounded either way.
"""

from __future__ import annotations

import abc
import asyncio
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import IO, Any

from .config import StoreSettings

CHUNK = 256 * 1024


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

    def chunks(self) -> AsyncIterator[bytes]:
        assert self._file is not None
        file = self._file
        file.flush()

        async def read() -> AsyncIterator[bytes]:
            offset = 0
            while chunk := os.pread(file.fileno(), CHUNK, offset):
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
    def __init__(self, settings: StoreSettings) -> None:
        from .store.redis import connect

        self._client: Any = connect(settings.replay_url, settings, decode=False)
        self._prefix = f"{settings.key_prefix}:res:"

    async def put(self, result_id: str, capture: Capture, ttl_seconds: float) -> bool:
        if not capture.complete:
            return False
        key = self._prefix + result_id
        ttl = int(ttl_seconds * 1000)
        from redis.exceptions import RedisError

        try:
            await self._client.delete(key)
            async for chunk in capture.chunks():
                await self._client.rpush(key, chunk)
            await self._client.pexpire(key, ttl)
        except (RedisError, OSError):
            return False
        return True

    async def get(self, result_id: str) -> AsyncIterator[bytes] | None:
        from redis.exceptions import RedisError

        key = self._prefix + result_id
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
                    raise RuntimeError("replay body expired while it was being sent")
                yield chunk

        return read()

    async def close(self) -> None:
        await self._client.aclose()
