"""One multiplexed Redis connection for the money scripts on the request path.

Every request runs two Lua scripts (reserve, settle). Through redis-py's client, pool
and retry layers one such call costs about 80 µs of CPU; written straight onto one
pipelined connection and parsed by hiredis it costs about 13 µs. Redis answers the
commands of one connection in order, so a queue of futures pairs each reply with its
caller and a single connection carries every concurrent request, with no pool; the
commands issued in one turn of the event loop leave in one write.

Used for single-node ``redis://`` and ``rediss://`` stores; clusters and sentinels
keep redis-py's routing. Errors leave as ``StoreError``. A caller that stops waiting
(the store timeout) leaves its slot in the queue, and the late reply is dropped; the
ledger then treats the step as possibly applied (see ``Ledger.hold``).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis

from .base import StoreError

# Past this many commands without an answer the store is not keeping up: fail fast
# instead of queueing without bound while it is stalled.
MAX_PENDING = 20_000


class ReplyError(Exception):
    """An error reply from Redis (hiredis builds these)."""


def pack(args: Sequence[str | int | bytes]) -> bytes:
    """A command in RESP: ``*<n>`` then ``$<len>`` and each argument."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", replyError=ReplyError)
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.outgoing: list[bytes] = []

    def flush(self) -> None:
        if self.outgoing and self.transport is not None and self.lost is None:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.waiting.popleft()
            if not future.done():  # its caller may have stopped waiting
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("redis closed the connection")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(StoreError(f"connection lost: {self.lost}"))


class MultiplexedConnection:
    """Commands from any number of tasks, pipelined on one connection, opened lazily."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._ssl = ssl.create_default_context() if parts.scheme == "rediss" else None
        self._setup: list[list[str | int | bytes]] = []
        if parts.password:
            user = unquote(parts.username) if parts.username else None
            auth: list[str | int | bytes] = ["AUTH", unquote(parts.password)]
            self._setup.append(auth if user is None else ["AUTH", user, unquote(parts.password)])
        db = parts.path.strip("/")
        if db and db != "0":
            self._setup.append(["SELECT", int(db)])
        self._connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._opening: asyncio.Lock | None = None

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._protocol is not None and self._protocol.lost is None:
                return self._protocol
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    _, protocol = await loop.create_connection(
                        _Protocol, self._host, self._port, ssl=self._ssl
                    )
                    for command in self._setup:
                        if isinstance(await self._send(protocol, command), ReplyError):
                            protocol.transport.close()  # type: ignore[union-attr]
                            raise StoreError("redis refused the connection setup (AUTH or SELECT)")
            except (OSError, TimeoutError) as exc:
                raise StoreError(f"cannot connect: {type(exc).__name__}") from exc
            self._protocol = protocol
            return protocol

    def _send(self, protocol: _Protocol, args: Sequence[str | int | bytes]) -> asyncio.Future[Any]:
        if len(protocol.waiting) >= MAX_PENDING:
            raise StoreError("redis is not answering (too many commands waiting)")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        protocol.waiting.append(future)
        # Commands issued in the same turn of the loop leave in one write.
        if not protocol.outgoing:
            loop.call_soon(protocol.flush)
        protocol.outgoing.append(pack(args))
        return future

    async def execute(self, *args: str | int | bytes) -> Any:
        protocol = await self._connection()
        reply = await self._send(protocol, args)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def evalsha(
        self, sha: str, script: str, keys: Sequence[str], args: Sequence[str | int]
    ) -> Any:
        """Run a script by its digest, loading it first if this server lacks it."""
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except ReplyError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise StoreError(f"script failed: {error}") from None
        await self.execute("SCRIPT", "LOAD", script)
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except ReplyError as error:
            raise StoreError(f"script failed: {error}") from None

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
