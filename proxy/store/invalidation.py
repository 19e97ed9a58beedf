"""Changes to key records reach every replica's cache within a second.

Why: each process keeps the key records it reads in a cache (``proxy.auth``), so that
a call costs no store round trip to learn whether its key is revoked, which models it
may use, or what ``/v1/usage`` shows as its limits. The hold step re-reads the key, so
money never depended on the cache; but a key revoked on one replica went on replaying
stored results and reading its usage on the others, and a new ``models`` restriction
let calls through, for the cache's whole lifetime. A change made anywhere (any
replica's admin API, or the CLI writing to the store directly) must be acted on by
every replica within ``BOUND_SECONDS``.

How: every write to a key record publishes the key's hash on ``<prefix>:changed`` in
the same Lua step (``key_write.lua``, ``forget_key.lua``), so no writer can change a
record without saying so. Each process subscribes (``Invalidations``, a background
task of the app's lifespan) and drops the record from its cache. Team records are
cached nowhere (the hold and tally steps read them), so nothing is published for them.

Messages sent while a subscription is down are lost, and a dead connection can look
alive. So the subscriber pings over its subscription every ``HEARTBEAT_SECONDS``:
Redis answers one connection in order, so the answer to a ping sent at S comes after
every change published before S, and a cached record may be used until S +
``BOUND_SECONDS`` (``trusted``). Past that (the subscription is lost, or Redis is
slow), a record is used only within ``BOUND_SECONDS`` of its read: a one-second TTL.
Each time the subscription is (re)opened the whole cache is dropped, since changes may
have been missed. A read begun before a change is heard is not cached. On a cluster a
change is published on the node of the key's slot and reaches the subscribed node over
the cluster bus, which adds a millisecond or so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio.cluster import RedisCluster

from .redis_client import close_client

log = logging.getLogger("apiyi_proxy.invalidation")

BOUND_SECONDS = 1.0  # a change is acted on everywhere within this
HEARTBEAT_SECONDS = 0.25
# A ping unanswered this long: the connection is given up and opened again.
DEAD_AFTER_SECONDS = 3.0
RETRY_SECONDS = (0.1, 0.25, 0.5, 1.0, 2.0)


def channel(prefix: str) -> str:
    """The channel on which the hashes of changed key records are published."""
    return f"{prefix}:changed"


class Cache(Protocol):
    def forget(self, key_hash: str) -> None: ...

    def clear(self) -> None: ...


class Invalidations:
    """One process's subscription to key-record changes, kept open in the background."""

    def __init__(self, connect: Callable[[], Any], channel: str) -> None:
        self._connect = connect  # a redis-py client whose replies are bytes
        self._channel = channel
        self._heard_until = -math.inf
        self._subscribed = False
        self._task: asyncio.Task[None] | None = None

    def trusted(self, read_at: float, now: float) -> bool:
        """Whether a record read at ``read_at`` may still be used at ``now``: within the
        bound of its read, or while every change published before ``now - BOUND_SECONDS``
        is known to have been acted on (monotonic clock)."""
        return now - read_at < BOUND_SECONDS or now < self._heard_until

    def start(self, cache: Cache, lost: Callable[[], None]) -> None:
        """Subscribe and keep ``cache`` told; ``lost`` counts each loss."""
        self._task = asyncio.create_task(self._run(cache, lost))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, cache: Cache, lost: Callable[[], None]) -> None:
        client = self._connect()
        try:
            if not hasattr(client, "pubsub"):  # redis-py before 8, on a cluster
                log.warning(
                    "this redis-py cannot subscribe to key changes on a cluster (8.0 or later "
                    "can): key records are cached for %s s at most",
                    BOUND_SECONDS,
                )
                lost()
                return
            failures = 0
            while True:
                reason = "closed"
                try:
                    await self._listen(client, cache)
                # Not only RedisError: redis-py's cluster client raises others (KeyError) too.
                except Exception as error:
                    reason = f"{type(error).__name__}: {error}"
                if self._subscribed or failures == 0:
                    log.warning(
                        "subscription to key changes %s (%s): key records are cached for "
                        "%s s at most until it is back",
                        "lost" if self._subscribed else "not opened",
                        reason,
                        BOUND_SECONDS,
                    )
                    lost()
                    failures = 0
                self._subscribed = False
                await asyncio.sleep(RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)])
                failures += 1
        finally:
            await close_client(client)

    async def _listen(self, client: Any, cache: Cache) -> None:
        """Act on changes until the subscription fails (it only ends by raising)."""
        if isinstance(client, RedisCluster):
            # Every node hears every PUBLISH: a random one, so a dead one is not tried forever.
            await client.initialize()
            pubsub = client.pubsub(node=client.get_random_node())
        else:
            pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            sent = 0
            ping: tuple[bytes, float] | None = None  # the unanswered ping, and when it left
            next_ping = time.monotonic()
            while True:
                now = time.monotonic()
                if ping is not None and now - ping[1] > DEAD_AFTER_SECONDS:
                    raise TimeoutError("no answer to a ping over the subscription")
                if ping is None and now >= next_ping:
                    sent += 1
                    ping = (b"%d" % sent, now)
                    await pubsub.ping(ping[0])
                    next_ping = now + HEARTBEAT_SECONDS
                wake = ping[1] + DEAD_AFTER_SECONDS if ping is not None else next_ping
                message = await pubsub.get_message(timeout=max(0.0, wake - now))
                if message is None:
                    continue
                kind = message["type"]
                if kind == "message":
                    cache.forget(message["data"].decode())
                elif kind == "subscribe":
                    # (Re)subscribed, also by redis-py's own reconnection: changes made
                    # while away were not heard.
                    cache.clear()
                    if not self._subscribed:
                        log.info("subscribed to key changes")
                    self._subscribed = True
                    ping, next_ping = None, now
                elif kind == "pong" and ping is not None and message["data"] == ping[0]:
                    self._heard_until = ping[1] + BOUND_SECONDS
                    ping = None
        finally:
            await pubsub.aclose()
