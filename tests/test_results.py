"""Replay bodies: the same contract for local disk, one Redis and a Redis cluster."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from proxy.config import StoreSettings
from proxy.results import CHUNK, Capture, DiskResults, RedisResults, ResultStore

from .conftest import RedisServer

pytestmark = pytest.mark.anyio
KB = 1024
BACKENDS = {"disk": None, "redis": "redis_for_results", "redis-cluster": "redis_cluster"}
REDIS_ONLY = pytest.mark.parametrize("open_results", ["redis", "redis-cluster"], indirect=True)
_counter = iter(range(1_000_000))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def redis_for_results() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


Opener = Callable[[int], ResultStore]


@pytest.fixture(params=list(BACKENDS))
async def open_results(request: pytest.FixtureRequest) -> AsyncIterator[Opener]:
    """Opens a result store with a given total; each test gets a key prefix of its own."""
    opened: list[ResultStore] = []
    fixture = BACKENDS[request.param]
    url = request.getfixturevalue(fixture).url if fixture else "memory://"
    prefix = f"t{next(_counter)}"

    def open_with(total: int) -> ResultStore:
        settings = StoreSettings(results_url=url, results_total_bytes=total, key_prefix=prefix)
        results: ResultStore = (
            DiskResults(total) if url.startswith("memory") else RedisResults(settings)
        )
        opened.append(results)
        return results

    yield open_with
    for results in opened:
        await results.close()


async def keep(results: ResultStore, result_id: str, body: bytes, ttl: float = 60) -> bool:
    """Store a body as the proxy does: captured in pieces, then discarded."""
    capture = Capture(len(body))
    for start in range(0, len(body), 100 * KB):
        capture.write(body[start : start + 100 * KB])
    return await put(results, result_id, capture, ttl)


async def put(results: ResultStore, result_id: str, capture: Capture, ttl: float = 60) -> bool:
    try:
        return await results.put(result_id, capture, ttl)
    finally:
        capture.discard()


async def stored(results: ResultStore, result_id: str) -> bytes | None:
    body = await results.get(result_id)
    if body is None:
        return None
    return b"".join([chunk async for chunk in body])


async def test_a_stored_body_replays_byte_for_byte(open_results: Opener) -> None:
    results = open_results(4096 * KB)
    body = os.urandom(700 * KB)  # several chunks
    assert await keep(results, "a", body)
    assert await stored(results, "a") == body
    assert await stored(results, "never-stored") is None


async def test_the_oldest_bodies_make_room_and_the_total_is_never_exceeded(
    open_results: Opener,
) -> None:
    results = open_results(1000 * KB)
    bodies = {f"r{i}": os.urandom(300 * KB) for i in range(5)}
    for result_id, body in bodies.items():
        assert await keep(results, result_id, body)
    assert [await stored(results, r) is not None for r in bodies] == [False] * 2 + [True] * 3
    assert await stored(results, "r4") == bodies["r4"]
    if isinstance(results, RedisResults):
        assert await reserved_bytes(results) == 900 * KB


async def test_a_body_larger_than_the_total_is_not_kept(open_results: Opener) -> None:
    results = open_results(500 * KB)
    small = os.urandom(100 * KB)
    assert await keep(results, "small", small)
    assert not await keep(results, "large", os.urandom(600 * KB))
    assert await stored(results, "large") is None
    assert await stored(results, "small") == small  # nothing dropped for a hopeless body


async def test_an_expired_body_is_gone_and_its_room_reclaimed_first(
    open_results: Opener,
) -> None:
    results = open_results(1000 * KB)
    assert await keep(results, "brief", os.urandom(500 * KB), 0.2)
    kept = os.urandom(300 * KB)
    assert await keep(results, "kept", kept)
    await asyncio.sleep(0.3)
    assert await stored(results, "brief") is None
    # Reclaiming the expired body is enough room: the older live one stays.
    assert await keep(results, "new", os.urandom(600 * KB))
    assert await stored(results, "kept") == kept
    assert await stored(results, "new") is not None


class InterruptedCapture(Capture):
    """A capture that lets another body be stored after its first chunk is written."""

    def __init__(self, body: bytes, meanwhile: Callable[[], Awaitable[None]]) -> None:
        super().__init__(len(body))
        self.write(body)
        self._meanwhile = meanwhile

    def chunks(self, size: int = CHUNK) -> AsyncIterator[bytes]:
        inner = super().chunks(size)
        meanwhile = self._meanwhile

        async def read() -> AsyncIterator[bytes]:
            first = True
            async for chunk in inner:
                yield chunk
                if first:
                    await meanwhile()
                    first = False

        return read()


@REDIS_ONLY  # a disk body is written in one step
async def test_a_body_dropped_while_it_is_written_is_not_kept(open_results: Opener) -> None:
    results = open_results(1000 * KB)
    assert isinstance(results, RedisResults)
    newer = os.urandom(600 * KB)

    async def store_newer() -> None:
        assert await keep(results, "newer", newer)

    assert not await put(results, "older", InterruptedCapture(os.urandom(600 * KB), store_newer))
    assert await stored(results, "older") is None
    assert await stored(results, "newer") == newer
    assert await reserved_bytes(results) == 600 * KB
    keys = await replay_keys(results)
    assert not [k for k in keys if b"older" in k]  # no chunk left behind


async def test_a_body_redis_refuses_gives_its_room_back() -> None:
    full = RedisServer(["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"])
    settings = StoreSettings(results_url=full.url, results_total_bytes=64 * 1024 * KB)
    results = RedisResults(settings)
    try:
        assert not await keep(results, "large", os.urandom(4096 * KB))
        assert await reserved_bytes(results) == 0
        assert await replay_keys(results) in ([], [results._base.encode() + b"used"])
    finally:
        await results.close()
        full.stop()


@REDIS_ONLY
async def test_replay_keys_share_one_hash_tag(open_results: Opener) -> None:
    results = open_results(1000 * KB)
    assert isinstance(results, RedisResults)
    assert await keep(results, "a", os.urandom(10 * KB))
    keys = await replay_keys(results)
    assert keys and all(b":{res}:" in k for k in keys)


async def reserved_bytes(results: RedisResults) -> int:
    return int(await results._client.get(results._base + "used") or 0)


async def replay_keys(results: RedisResults) -> list[bytes]:
    return [k async for k in results._client.scan_iter(match=results._base + "*")]
