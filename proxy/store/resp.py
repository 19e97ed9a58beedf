"""One multiplexed Redis connection for the money scripts on the request path.

Every request runs two Lua scripts (reserve, settle). Through redis-py's client, pool
and retry layers one such call costs about 80 µs of CPU; written straight onto one
pipelined connection and parsed by hiredis it costs about 13 µs. Redis answers the
commands of one connection in order, so a queue of futures pairs each reply with its
caller and a single connection carries every concurrent request, with no pool; the
commands issued in one turn of the event loop leave in one write.

Used for single-node ``redis://`` and ``rediss://`` stores, reached as redis-py's
client reaches them (one ``RedisTarget``: address, database, credentials, TLS
context); clusters and sentinels keep redis-py's routing. Errors leave as
``StoreError``. A caller that stops waiting (the store timeout) leaves its slot in
the queue, and the late reply is dropped; the ledger then treats the step as
possibly applied (see ``Ledger.hold``). While the oldest command has gone unanswered
past the store timeout, new commands are refused at once.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any, cast

import hiredis

from ..redis_url import RedisTarget
from .base import StoreError

# Past this many commands without an answer the store is not keeping up: fail fast
# instead of queueing without bound while it is stalled.
MAX_PENDING = 20_000
# A connection whose oldest command has waited this many stall bounds is given up.
ABANDON_AFTER_STALLS = 10


class ReplyError(StoreError):
    """An error reply from Redis (hiredis builds these); the command was applied or not
    as Redis says, so it counts as possibly applied."""


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
        self.sent_at: collections.deque[float] = collections.deque()  # one per waiting
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
            self.sent_at.popleft()
            if not future.done():  # its caller may have stopped waiting
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("redis closed the connection")
        self.sent_at.clear()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(StoreError(f"connection lost: {self.lost}"))


class MultiplexedConnection:
    """Commands from any number of tasks, pipelined on one connection, opened lazily."""

    def __init__(self, target: RedisTarget, timeout: float) -> None:
        self._target = target
        self._setup: list[list[str | int | bytes]] = []
        if target.username:  # as redis-py authenticates
            self._setup.append(["AUTH", target.username, target.password or ""])
        elif target.password:
            self._setup.append(["AUTH", target.password])
        if target.db:
            self._setup.append(["SELECT", target.db])
        # The store timeout: bounds connecting, and how long the oldest command may go
        # unanswered before the store counts as stalled.
        self._timeout = timeout
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
                async with asyncio.timeout(self._timeout):
                    _, protocol = await loop.create_connection(
                        _Protocol, self._target.host, self._target.port, ssl=self._target.tls
                    )
                    for command in self._setup:
                        if isinstance(await self._send(protocol, command), ReplyError):
                            protocol.transport.close()  # type: ignore[union-attr]
                            raise StoreError("redis refused the connection setup (AUTH or SELECT)")
            except (OSError, TimeoutError) as exc:
                raise StoreError(
                    f"cannot connect: {type(exc).__name__}", maybe_applied=False
                ) from exc
            self._protocol = protocol
            return protocol

    def _send(self, protocol: _Protocol, args: Sequence[str | int | bytes]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if protocol.sent_at and now - protocol.sent_at[0] > self._timeout:
            # Stalled: the oldest command is past the store timeout. Refuse at once
            # rather than make every caller wait out the timeout too; give the
            # connection up if it stays stalled, so a dead peer is not waited on forever.
            if now - protocol.sent_at[0] > ABANDON_AFTER_STALLS * self._timeout:
                assert protocol.transport is not None
                protocol.transport.abort()
            raise StoreError("redis is not answering", maybe_applied=False)
        if len(protocol.waiting) >= MAX_PENDING:
            raise StoreError("redis is not answering (too many waiting)", maybe_applied=False)
        future: asyncio.Future[Any] = loop.create_future()
        protocol.waiting.append(future)
        protocol.sent_at.append(now)
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
