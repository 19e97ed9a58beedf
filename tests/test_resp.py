"""The scripts' pipelined connection, against a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator

import pytest

from proxy.redis_url import RedisTarget
from proxy.store import StoreError, resp
from proxy.store.resp import MultiplexedConnection, pack

from .conftest import RedisServer

pytestmark = pytest.mark.anyio
SCRIPT = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def secured() -> Iterator[RedisServer]:
    server = RedisServer(["--requirepass", "s3cret"])
    yield server
    server.stop()


def test_pack_is_resp() -> None:
    assert (
        pack(["SET", "k", 12, b"\x00v"])
        == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$2\r\n\x00v\r\n"
    )


async def test_replies_pair_with_their_callers(redis_server: RedisServer) -> None:
    conn = MultiplexedConnection(RedisTarget.from_url(redis_server.url), 1.0)
    try:
        results = await asyncio.gather(*(conn.execute("ECHO", f"call-{i}") for i in range(500)))
        assert results == [f"call-{i}" for i in range(500)]
        # A caller that stops waiting leaves its slot; the next callers get their own.
        slow = asyncio.ensure_future(conn.execute("DEBUG", "SLEEP", "0.2"))
        await asyncio.sleep(0.05)
        slow.cancel()
        assert await conn.execute("ECHO", "after") == "after"
    finally:
        await conn.close()


async def test_scripts_load_themselves_when_the_server_lacks_them(
    redis_server: RedisServer,
) -> None:
    conn = MultiplexedConnection(RedisTarget.from_url(redis_server.url), 1.0)
    try:
        assert await conn.evalsha(SHA, SCRIPT, ["counter"], ["a"]) == ["counter", "a", 1]
        await conn.execute("SCRIPT", "FLUSH")
        assert await conn.evalsha(SHA, SCRIPT, ["counter"], ["b"]) == ["counter", "b", 2]
        with pytest.raises(StoreError, match="script failed"):
            await conn.evalsha("0" * 40, "return redis.call('NOPE')", [], [])
    finally:
        await conn.close()


async def test_password_and_database_from_the_url(secured: RedisServer) -> None:
    url = f"redis://:s3cret@127.0.0.1:{secured.port}/3"
    conn = MultiplexedConnection(RedisTarget.from_url(url), 1.0)
    try:
        assert "db=3" in await conn.execute("CLIENT", "INFO")
    finally:
        await conn.close()
    wrong = MultiplexedConnection(
        RedisTarget.from_url(f"redis://:nope@127.0.0.1:{secured.port}/0"), 1.0
    )
    with pytest.raises(StoreError, match="refused"):
        await wrong.execute("PING")
    await wrong.close()


async def test_a_lost_server_fails_callers_and_a_new_one_is_reached() -> None:
    server = RedisServer()
    port = server.port
    conn = MultiplexedConnection(RedisTarget.from_url(server.url), 0.5)
    try:
        assert await conn.execute("PING") == "PONG"
        server.stop()
        with pytest.raises(StoreError):
            await conn.execute("PING")
        with pytest.raises(StoreError, match="cannot connect"):
            await conn.execute("PING")
        server = RedisServer(port=port)
        assert await conn.execute("PING") == "PONG"
    finally:
        await conn.close()
        server.stop()


async def test_a_stalled_server_is_refused_past_the_queue_cap(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resp, "MAX_PENDING", 10)
    conn = MultiplexedConnection(RedisTarget.from_url(redis_server.url), 1.0)
    try:
        await conn.execute("PING")
        redis_server.pause()
        waiting = [asyncio.ensure_future(conn.execute("PING")) for _ in range(10)]
        await asyncio.sleep(0.05)
        with pytest.raises(StoreError, match="not answering"):
            await conn.execute("PING")
        redis_server.resume()
        assert await asyncio.gather(*waiting) == ["PONG"] * 10
    finally:
        redis_server.resume()
        await conn.close()


async def test_a_stalled_server_is_refused_at_once_past_the_timeout(
    redis_server: RedisServer,
) -> None:
    loop = asyncio.get_running_loop()
    conn = MultiplexedConnection(RedisTarget.from_url(redis_server.url), 0.2)
    try:
        await conn.execute("PING")
        redis_server.pause()
        first = asyncio.ensure_future(conn.execute("PING"))
        await asyncio.sleep(0.3)  # the oldest command is now past the store timeout
        started = loop.time()
        with pytest.raises(StoreError, match="not answering") as refused:
            await conn.execute("PING")
        assert loop.time() - started < 0.05
        assert not refused.value.maybe_applied  # never sent: nothing to undo
        redis_server.resume()
        assert await first == "PONG"
        assert await conn.execute("PING") == "PONG"
    finally:
        redis_server.resume()
        await conn.close()
