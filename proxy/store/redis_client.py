"""redis-py clients for every supported URL scheme, and the Lua scripts they run."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from importlib import resources
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from ..config import StoreSettings
from .base import StoreError

P = ParamSpec("P")
T = TypeVar("T")


def translated(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Redis and socket errors leave the store only as ``StoreError``."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        store: Any = args[0]  # a store with a ``slots`` semaphore
        try:
            # The cluster client refuses, rather than waits, past its connection cap:
            # queue here instead so a burst waits its turn within the store timeout.
            async with store.slots:
                return await method(*args, **kwargs)
        except (RedisError, OSError) as exc:
            raise StoreError(f"{type(exc).__name__}: {exc}") from exc

    return wrapper


def load_script(name: str) -> str:
    lua = resources.files("proxy") / "lua"
    return (lua / "common.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


def connect(url: str, settings: StoreSettings, *, decode: bool = True) -> Any:
    """A redis-py asyncio client for any of the supported URL schemes."""
    timeout = settings.timeout_seconds
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "decode_responses": decode,
        "health_check_interval": 30,
    }
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme == "redis+cluster":
        return RedisCluster.from_url(
            url.replace("redis+cluster://", "redis://", 1),
            max_connections=settings.max_connections,
            **common,
        )
    if scheme == "redis+sentinel":
        hosts = [
            (h.rpartition(":")[0] or h, int(h.rpartition(":")[2] or 26379))
            for h in parts.netloc.rpartition("@")[2].split(",")
        ]
        service = parts.path.strip("/").split("/")[0] or "mymaster"
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts, sentinel_kwargs={"socket_timeout": timeout}, **common
        )
        return sentinel.master_for(service, password=parts.password)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=settings.max_connections, timeout=timeout, **common
    )
    return aioredis.Redis.from_pool(pool)


async def close_client(client: Any) -> None:
    """Close a client of ``connect``, and the connections a sentinel-managed one keeps
    to its sentinels (its own ``aclose`` leaves them open)."""
    await client.aclose()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()
