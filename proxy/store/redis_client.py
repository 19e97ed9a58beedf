"""redis-py clients for every supported URL scheme, and the Lua scripts they run."""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable, Coroutine, Mapping
from importlib import resources
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from ..config import StoreSettings
from ..redis_url import RedisTarget
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


class TLSConnection(aioredis.Connection):
    """redis-py's connection over the target's own TLS context: the one the scripts'
    connection uses, so both verify the server alike (redis-py's ``SSLConnection``
    would build a second context from options of its own reading)."""

    def __init__(self, *, tls: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tls = tls

    def _connection_arguments(self) -> Mapping[str, Any]:
        return {**super()._connection_arguments(), "ssl": self.tls}


def connect(url: str, settings: StoreSettings, *, decode: bool = True) -> Any:
    """A redis-py asyncio client for any of the supported URL schemes."""
    common = _common(settings, decode)
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
            hosts, sentinel_kwargs={"socket_timeout": settings.timeout_seconds}, **common
        )
        return sentinel.master_for(service, password=parts.password)
    return connect_node(RedisTarget.from_url(url), settings, decode=decode)


def connect_node(target: RedisTarget, settings: StoreSettings, *, decode: bool = True) -> Any:
    """A redis-py asyncio client for one ``redis://`` or ``rediss://`` server."""
    reach: dict[str, Any] = {"connection_class": aioredis.Connection}
    if target.tls is not None:
        reach = {"connection_class": TLSConnection, "tls": target.tls}
    pool = aioredis.BlockingConnectionPool(
        max_connections=settings.max_connections,
        timeout=settings.timeout_seconds,
        host=target.host,
        port=target.port,
        db=target.db,
        username=target.username,
        password=target.password,
        **reach,
        **_common(settings, decode),
    )
    return aioredis.Redis.from_pool(pool)


def _common(settings: StoreSettings, decode: bool) -> dict[str, Any]:
    return {
        "socket_timeout": settings.timeout_seconds,
        "socket_connect_timeout": settings.timeout_seconds,
        "decode_responses": decode,
        "health_check_interval": 30,
    }


async def close_client(client: Any) -> None:
    """Close a client of ``connect``, and the connections a sentinel-managed one keeps
    to its sentinels (its own ``aclose`` leaves them open)."""
    await client.aclose()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()
