"""The per-request log: a record per call that held money, read by GET /admin/requests.

The store side runs against every backend (memory, a real Redis, a real cluster); the
rest runs real proxy processes against the fake upstream and a real Redis, the log
written off the request path as in production.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from proxy.config import StoreSettings
from proxy.fake_upstream import make_png
from proxy.metrics import Metrics
from proxy.request_log import QUEUE_MAX, RequestLog
from proxy.store import BadCursor, MemoryStore, RequestRecord, Store
from proxy.store.redis import RedisStore

from .conftest import (
    ADMIN_TOKEN,
    ProxyProcess,
    RedisServer,
    ThreadServer,
    process_env,
)

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
PRICE = 30_000
HEADER = "time,request_id,key_id,team,model,size,images,cost_usd,outcome"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# the store contract -------------------------------------------------------------------
SERVERS = {"redis": "redis_for_log", "redis-cluster": "redis_cluster"}
_prefixes = iter(range(1_000_000))


@pytest.fixture(scope="module")
def redis_for_log() -> Iterator[RedisServer]:
    # Small stream nodes, so that approximate trimming keeps close to the cap.
    server = RedisServer(["--stream-node-max-entries", "10"])
    yield server
    server.stop()


@pytest.fixture(params=["memory", *SERVERS])
def backend(request: pytest.FixtureRequest) -> Callable[[int], Store]:
    def make(cap: int) -> Store:
        if request.param == "memory":
            return MemoryStore(request_log_max=cap)
        server = request.getfixturevalue(SERVERS[request.param])
        settings = StoreSettings(
            url=server.url, key_prefix=f"log{next(_prefixes)}", request_log_max=cap
        )
        return RedisStore.from_settings(settings)

    return make


def record(i: int, key: str = "key_a", team: str | None = None) -> RequestRecord:
    return RequestRecord(
        time=1_764_000_000.0 + i,
        request_id=f"req_{i:024x}",
        key_id=key,
        team=team,
        model="gpt-image-2-vip",
        size="2048x1152" if i % 2 else None,
        images=1,
        cost_micros=PRICE * (i % 3),
        outcome="settled",
    )


async def every_page(
    store: Store, key: str | None, team: str | None, limit: int
) -> tuple[list[RequestRecord], int]:
    """All records a filter finds, following cursors; and how many pages it took."""
    found: list[RequestRecord] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = await store.requests(key, team, limit, cursor)
        found += page
        pages += 1
        assert pages < 1000, "the cursors never end"
        if cursor is None:
            return found, pages


async def with_store(
    make: Callable[[int], Store], cap: int, check: Callable[[Store], Awaitable[None]]
) -> None:
    store = make(cap)
    try:
        await store.open()
        await check(store)
    finally:
        await store.close()


def test_pages_are_newest_first_and_cursors_visit_each_record_once(
    backend: Callable[[int], Store],
) -> None:
    records = [record(i, "key_a" if i % 3 else "key_b", "design" if i % 2 else None)
               for i in range(95)]  # fmt: skip

    async def check(store: Store) -> None:
        await store.append_requests(records[:40])
        await store.append_requests(records[40:])
        newest = list(reversed(records))
        page, cursor = await store.requests(None, None, 10, None)
        assert page == newest[:10] and cursor is not None
        for limit in (1, 7, 95, 1000):
            found, _ = await every_page(store, None, None, limit)
            assert found == newest
        found, pages = await every_page(store, None, None, 95)
        assert pages == 1  # a full last page says nothing older is left
        for key, team in (("key_b", None), (None, "design"), ("key_a", "design")):
            found, _ = await every_page(store, key, team, 4)
            assert found == [r for r in newest if r.matches(key, team)] != []

    asyncio.run(with_store(backend, 1000, check))


def test_a_filter_that_matches_nothing_reads_a_bounded_page(
    backend: Callable[[int], Store],
) -> None:
    async def check(store: Store) -> None:
        await store.append_requests([record(i) for i in range(120)])
        page, cursor = await store.requests("key_nobody", None, 2, None)
        assert page == [] and cursor is not None  # looked at 20 records, not 120
        found, pages = await every_page(store, "key_nobody", None, 2)
        assert found == [] and pages == 6
        # Each page went on from where the last stopped: the records of a key are found
        # however far apart they are.
        await store.append_requests([record(500, "key_rare")])
        await store.append_requests([record(i) for i in range(600, 700)])
        found, _ = await every_page(store, "key_rare", None, 1)
        assert [r.request_id for r in found] == [record(500).request_id]

    asyncio.run(with_store(backend, 1000, check))


def test_a_cursor_it_never_handed_out_is_refused(backend: Callable[[int], Store]) -> None:
    async def check(store: Store) -> None:
        await store.append_requests([record(1), record(2)])
        _, handed_out = await store.requests(None, None, 1, None)
        assert handed_out is not None
        page, _ = await store.requests(None, None, 1, handed_out)
        assert page == [record(1)]
        # The other backend's shape of cursor too: "7" in Redis, "7-0" in memory.
        other = "7" if "-" in handed_out else "7-0"
        for cursor in ("x", "12-", "-1", "1-2-3", "9" * 30, "1" * 25 + "-0", "१२", other):
            with pytest.raises(BadCursor):
                await store.requests(None, None, 1, cursor)

    asyncio.run(with_store(backend, 1000, check))


# Memory keeps the cap exactly; Redis trims whole stream nodes: 10 entries in the
# test's own Redis, Redis's default 100 in the cluster's.
NODE_SLACK = {"memory": 0, "redis": 10, "redis-cluster": 100}


def test_the_log_keeps_about_its_cap(
    backend: Callable[[int], Store], request: pytest.FixtureRequest
) -> None:
    slack = NODE_SLACK[request.node.callspec.params["backend"]]

    async def check(store: Store) -> None:
        for start in range(0, 300, 30):
            await store.append_requests([record(i) for i in range(start, start + 30)])
        found, _ = await every_page(store, None, None, 1000)
        assert 50 <= len(found) <= 50 + slack
        assert found == [record(i) for i in reversed(range(300 - len(found), 300))]

    asyncio.run(with_store(backend, 50, check))


# the writer -------------------------------------------------------------------------------
def dropped(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("apiyi_proxy_request_log_dropped_total")


def test_a_full_queue_drops_and_counts_and_shutdown_writes_the_rest(
    redis_server: RedisServer,
) -> None:
    async def check() -> None:
        settings = StoreSettings(url=redis_server.url)
        store, metrics = RedisStore.from_settings(settings), Metrics()
        log = RequestLog(store, settings, metrics)
        await store.open()
        log.start()
        # No await between the adds: the writer has not run, the queue fills.
        for i in range(QUEUE_MAX + 5):
            log.add(record(i))
        assert dropped(metrics) == 5
        await log.stop()  # the queue is written, batch by batch, before the writer ends
        found, _ = await every_page(store, None, None, 1000)
        await store.close()
        assert found == [record(i) for i in reversed(range(QUEUE_MAX))]
        assert dropped(metrics) == 5

    asyncio.run(check())


def test_a_stalled_store_costs_the_log_records_not_the_caller_time(
    redis_server: RedisServer,
) -> None:
    async def check() -> None:
        settings = StoreSettings(url=redis_server.url, timeout_seconds=0.2)
        store, metrics = RedisStore.from_settings(settings), Metrics()
        log = RequestLog(store, settings, metrics)
        await store.open()
        log.start()
        redis_server.pause()
        try:
            started = time.perf_counter()
            for i in range(10):
                log.add(record(i))
            assert time.perf_counter() - started < 0.05  # add never waits on the store
            deadline = time.monotonic() + 5
            while dropped(metrics) != 10:  # the batch gave up at the store's time bound
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            log.add(record(10))
            started = time.perf_counter()
            await log.stop(grace=1.0)
            assert time.perf_counter() - started < 1.5
            assert dropped(metrics) == 11
        finally:
            redis_server.resume()
            await store.close()

    asyncio.run(check())


# through the proxy ----------------------------------------------------------------------
def env_for(upstream: ThreadServer, **extra: str) -> dict[str, str]:
    return process_env(upstream.url, **{"APIYI_PROXY_UPSTREAM__READ_TIMEOUT": "1", **extra})


def generate(proxy: ProxyProcess, key: str, prompt: str = "p", **body: Any) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/images/generations",
        json={"prompt": prompt, "response_format": "url", **body},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def edit(proxy: ProxyProcess, key: str) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/images/edits",
        data={"prompt": "p", "response_format": "url", "size": "1280x1280"},
        files={"image": ("a.png", make_png(), "image/png")},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def admin_requests(proxy: ProxyProcess, **params: Any) -> httpx.Response:
    return httpx.get(proxy.url + "/admin/requests", params=params, headers=ADMIN, timeout=30)


def logged(proxy: ProxyProcess, count: int, **params: Any) -> list[dict[str, Any]]:
    """The log's records once it holds ``count`` (written off the request path)."""
    deadline = time.monotonic() + 10
    while True:
        answer = admin_requests(proxy, limit=1000, **params)
        assert answer.status_code == 200, answer.text
        data: list[dict[str, Any]] = answer.json()["data"]
        if len(data) >= count or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


def key_id(proxy: ProxyProcess, name: str, **fields: Any) -> tuple[str, str]:
    created = httpx.post(
        proxy.url + "/admin/keys", json={"name": name, **fields}, headers=ADMIN, timeout=10
    )
    assert created.status_code == 201, created.text
    return created.json()["key"], created.json()["id"]


def metric(proxy: ProxyProcess, name: str) -> float:
    text = httpx.get(proxy.url + "/metrics", timeout=10).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, name
    return float(match[1])


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
        return
    server = RedisServer()
    yield server.url
    server.stop()


def test_every_call_that_held_money_is_one_record(
    upstream: ThreadServer, proxy_process: Callable[..., ProxyProcess], store_url: str
) -> None:
    proxy = proxy_process(env_for(upstream, APIYI_PROXY_STORE_URL=store_url))
    design, design_id = key_id(proxy, "design-bot", team="design")
    solo, solo_id = key_id(proxy, "solo")

    ok = generate(proxy, design, size="2048 × 1152")
    released = generate(proxy, design, "[fake:500] p")
    uncertain = generate(proxy, solo, "[fake:timeout] p")
    refused = generate(proxy, solo, n=3)  # the policy refuses it: no money held
    broke, _ = key_id(proxy, "broke", daily_usd=0)
    over_budget = generate(proxy, broke)  # refused by the hold step: none taken
    edited = edit(proxy, solo)
    statuses = [r.status_code for r in (ok, released, uncertain, refused, over_budget, edited)]
    assert statuses == [200, 502, 504, 400, 429, 200]

    calls = [ok, released, uncertain, edited]
    data = logged(proxy, len(calls))
    assert [r["request_id"] for r in data] == [c.headers["x-request-id"] for c in reversed(calls)]
    by_id = {r["request_id"]: r for r in data}
    assert all(ISO.match(r["time"]) for r in data)
    assert [r["time"] for r in data] == sorted((r["time"] for r in data), reverse=True)
    fields = ("key_id", "team", "model", "size", "images", "cost_usd", "outcome")
    expected = {
        ok: (design_id, "design", "gpt-image-2-vip", "2048x1152", 1, 0.03, "settled"),
        released: (design_id, "design", "gpt-image-2-vip", None, 0, 0.0, "released"),
        uncertain: (solo_id, None, "gpt-image-2-vip", None, 0, 0.03, "uncertain"),
        edited: (solo_id, None, "gpt-image-2-vip", "1280x1280", 1, 0.03, "settled"),
    }
    for call, values in expected.items():
        row = by_id[call.headers["x-request-id"]]
        assert tuple(row[f] for f in fields) == values
        assert set(row) == {"time", "request_id", *fields}

    # Filters, alone and together.
    assert {r["request_id"] for r in logged(proxy, 2, key=design_id)} == {
        ok.headers["x-request-id"],
        released.headers["x-request-id"],
    }
    assert [r["key_id"] for r in logged(proxy, 2, team="design")] == [design_id] * 2
    assert logged(proxy, 0, key=solo_id, team="design") == []

    # One record a page: the cursors visit every record exactly once, newest first.
    seen, cursor = [], None
    while True:
        params = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        page = admin_requests(proxy, **params).json()
        seen += [r["request_id"] for r in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [r["request_id"] for r in data]

    # CSV: the header, then every matching record; costs exact from micro-dollars.
    exported = admin_requests(proxy, format="csv")
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("text/csv")
    lines = exported.text.splitlines()
    assert lines[0] == HEADER
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [r["request_id"] for r in rows] == seen
    first = rows[seen.index(ok.headers["x-request-id"])]
    assert (first["team"], first["cost_usd"], first["images"]) == ("design", "0.03", "1")
    assert rows[seen.index(uncertain.headers["x-request-id"])]["team"] == ""
    assert rows[seen.index(released.headers["x-request-id"])]["cost_usd"] == "0"
    team_csv = admin_requests(proxy, format="csv", team="design", limit=1)
    assert len(team_csv.text.splitlines()) == 3  # the whole filtered log, not one page


BAD_PARAMETERS = [
    ({"limit": "0"}, "limit"),
    ({"limit": "1001"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": "-5"}, "limit"),
    ({"limit": "9" * 5000}, "limit"),
    ({"cursor": "not-a-cursor"}, "cursor"),
    ({"cursor": "9" * 5000}, "cursor"),
    ({"cursor": "1-0", "format": "csv"}, "cursor"),
    ({"format": "xml"}, "format"),
]


def test_bad_parameters_are_400s_naming_the_param(
    upstream: ThreadServer, proxy_process: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_process(env_for(upstream))
    for params, param in BAD_PARAMETERS:
        answer = admin_requests(proxy, **params)
        assert answer.status_code == 400, (params, answer.text)
        assert answer.json()["error"]["param"] == param
        assert answer.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(proxy.url + "/admin/requests", timeout=10).status_code == 401


def test_the_log_holds_about_its_cap_in_the_proxy(
    upstream: ThreadServer, proxy_process: Callable[..., ProxyProcess]
) -> None:
    server = RedisServer(["--stream-node-max-entries", "10"])
    try:
        cap = {"APIYI_PROXY_STORE__REQUEST_LOG_MAX": "20"}
        shared = proxy_process(env_for(upstream, APIYI_PROXY_STORE_URL=server.url, **cap))
        local = proxy_process(env_for(upstream, **cap))
        for proxy in (shared, local):
            key, _ = key_id(proxy, "busy")
            with httpx.Client(headers={"authorization": f"Bearer {key}"}, timeout=30) as client:
                url = proxy.url + "/v1/images/generations"
                body = {"prompt": "p", "response_format": "url"}
                ids = [client.post(url, json=body).headers["x-request-id"] for _ in range(60)]
            time.sleep(0.5)  # the writer's last batch
            data = logged(proxy, 20)
            assert 20 <= len(data) <= 30
            assert [r["request_id"] for r in data] == ids[::-1][: len(data)]
        local_data = logged(local, 20)
        assert len(local_data) == 20  # memory keeps the cap exactly
        stream = redis.Redis.from_url(server.url)
        assert 20 <= stream.xlen("apiyi:requests") <= 30
        stream.close()
    finally:
        server.stop()


def test_a_failing_log_never_fails_a_call(
    upstream: ThreadServer,
    proxy_process: Callable[..., ProxyProcess],
    redis_server: RedisServer,
) -> None:
    """The log's stream key holds a string: every XADD answers WRONGTYPE, while the
    ledger's own keys answer as ever. Calls are served and booked; the records are
    dropped and counted; once the key is fixed, the log goes on."""
    proxy = proxy_process(env_for(upstream, APIYI_PROXY_STORE_URL=redis_server.url))
    key, kid = key_id(proxy, "steady", team="ops")
    direct = redis.Redis.from_url(redis_server.url)
    direct.set("apiyi:requests", "not a stream")

    answers = [generate(proxy, key) for _ in range(5)]
    assert [a.status_code for a in answers] == [200] * 5
    deadline = time.monotonic() + 10
    while metric(proxy, "apiyi_proxy_request_log_dropped_total") < 5:
        assert time.monotonic() < deadline, "the dropped records were not counted"
        time.sleep(0.05)
    usage = httpx.get(proxy.url + "/admin/usage", params={"key": kid}, headers=ADMIN).json()
    assert usage["keys"][0]["today"]["spent_usd"] == pytest.approx(0.15)
    assert usage["keys"][0]["today"]["requests"] == 5
    # Reading the broken log is a store failure the route reports, never a 500.
    assert admin_requests(proxy).status_code == 503
    assert admin_requests(proxy, format="csv").status_code == 503

    direct.delete("apiyi:requests")
    after = generate(proxy, key)
    assert after.status_code == 200
    assert [r["request_id"] for r in logged(proxy, 1)] == [after.headers["x-request-id"]]
    assert metric(proxy, "apiyi_proxy_request_log_dropped_total") == 5
    direct.close()


def test_a_call_that_ends_during_shutdown_is_logged(
    upstream: ThreadServer,
    proxy_process: Callable[..., ProxyProcess],
    redis_server: RedisServer,
) -> None:
    """SIGTERM while a call is in flight: the call drains, and its record reaches the
    store before the process exits."""
    env = env_for(upstream, APIYI_PROXY_STORE_URL=redis_server.url)
    proxy = proxy_process({**env, "APIYI_PROXY_UPSTREAM__READ_TIMEOUT": "10"})
    key, _ = key_id(proxy, "late")
    answers: list[httpx.Response] = []
    call = threading.Thread(
        target=lambda: answers.append(generate(proxy, key, "[fake:latency=1.5] p"))
    )
    call.start()
    time.sleep(0.5)
    proxy.process.send_signal(signal.SIGTERM)
    call.join(30)
    assert proxy.process.wait(30) == 0
    assert [a.status_code for a in answers] == [200]
    direct = redis.Redis.from_url(redis_server.url, decode_responses=True)
    entries: Any = direct.xrange("apiyi:requests")
    written = [fields["request_id"] for _, fields in entries]
    direct.close()
    assert written == [answers[0].headers["x-request-id"]]
