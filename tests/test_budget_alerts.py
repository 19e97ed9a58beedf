"""Budget alert webhooks, through real parts: proxy processes (one, or three replicas on
one real Redis), the fake upstream, and a real HTTP receiver on a loopback port.

Each threshold of a budget must reach each webhook exactly once per period, however
many replicas race across it; bodies are signed; a failing receiver is retried and
then given up, and no call waits on any of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis

from proxy import alerts, config
from proxy.config import StoreSettings
from proxy.keys import KeyHasher, issue_key
from proxy.store import Crossing, HoldRequest, KeyRecord, Limits, MemoryStore, Periods, Store, Team
from proxy.store import group_of as group_of_key
from proxy.store.redis import RedisStore

from .conftest import (
    ADMIN_TOKEN,
    ROOT,
    ProxyProcess,
    RedisServer,
    ThreadServer,
    free_port,
    process_env,
)

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
SECRET = "whsec-for-tests-4f1c9a0e"
# Slack-style: the URL itself holds a token, which must never reach a log.
URL_TOKEN = "T0KEN-IN-THE-URL-8c2e"
FIXED_FIELDS = {
    "type", "scope", "id", "name", "period", "threshold", "spent_usd", "limit_usd", "time",
}  # fmt: skip


# the receiver ----------------------------------------------------------------------------


class Receiver:
    """A real HTTP server recording every POST; it can fail the first ``fail_first``
    attempts with 500, or hang every attempt for ``hang`` seconds then answer 500."""

    def __init__(self) -> None:
        self.records: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = 0
        self.hang = 0.0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["content-length"]))
                with receiver.lock:
                    receiver.records.append(({k.lower(): v for k, v in self.headers.items()}, data))
                    failing = len(receiver.records) <= receiver.fail_first
                if receiver.hang:
                    time.sleep(receiver.hang)
                    failing = True
                self.send_response(500 if failing else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/{URL_TOKEN}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(data) for _, data in self.records]

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.records) < count:
            assert time.monotonic() < deadline, f"{len(self.records)} deliveries of {count}"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def readme_signature_check() -> Callable[[bytes, str, str], bool]:
    """The README's verification snippet, run as a receiver would copy it."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Budget alerts\n")
    block = re.findall(r"```python\n(.*?)```", text[start:], re.DOTALL)[0]
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    check: Callable[[bytes, str, str], bool] = namespace["genuine"]
    return check


def env_for(
    upstream: ThreadServer,
    webhooks: list[dict[str, Any]],
    store_url: str = "memory://",
    **alerts: str,
) -> dict[str, str]:
    env = process_env(
        upstream.url,
        APIYI_PROXY_STORE_URL=store_url,
        APIYI_PROXY_ALERTS__WEBHOOKS=json.dumps(webhooks),
        APIYI_PROXY_ALERTS__BACKOFF_SECONDS="0.05",
        ALERT_SECRET=SECRET,
    )
    env.update({f"APIYI_PROXY_ALERTS__{name.upper()}": value for name, value in alerts.items()})
    return env


def json_hook(receiver: Receiver) -> dict[str, Any]:
    return {"url": receiver.url, "secret_env": "ALERT_SECRET", "format": "json"}


def create_key(proxy: ProxyProcess, **fields: Any) -> tuple[str, str]:
    response = httpx.post(proxy.url + "/admin/keys", json={"name": "bot", **fields}, headers=ADMIN)
    assert response.status_code == 201, response.text
    body = response.json()
    return body["key"], body["id"]


async def fire(urls: list[str], key: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=count)) as c:
        return await asyncio.gather(
            *(
                c.post(
                    urls[i % len(urls)] + "/v1/images/generations",
                    json={"prompt": "p", "response_format": "url"},
                    headers={"authorization": f"Bearer {key}"},
                )
                for i in range(count)
            )
        )


def counted(proxy: ProxyProcess, result: str) -> float:
    text = httpx.get(proxy.url + "/metrics", timeout=5).text
    found = re.search(
        rf'^apiyi_proxy_budget_alerts_total\{{result="{result}"\}} (\S+)$', text, re.M
    )
    assert found is not None, "the budget alerts family is not exported at start-up"
    return float(found.group(1))


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


# across replicas -------------------------------------------------------------------------


def test_three_replicas_racing_across_the_thresholds_deliver_each_exactly_once(
    proxy_process: Callable[..., ProxyProcess],
    redis_server: RedisServer,
    upstream: ThreadServer,
    receiver: Receiver,
) -> None:
    env = env_for(upstream, [json_hook(receiver)], redis_server.url)
    replicas = [proxy_process(env) for _ in range(3)]
    key, key_id = create_key(replicas[0], name="design-bot", daily_usd=0.30)  # 10 images

    answers = asyncio.run(fire([r.url for r in replicas], key, 10))
    assert [a.status_code for a in answers] == [200] * 10, [a.text for a in answers]
    receiver.wait_for(3)
    time.sleep(1.5)  # a duplicate from a slower replica would arrive by now
    assert len(receiver.records) == 3, receiver.bodies()

    genuine = readme_signature_check()
    for headers, data in receiver.records:
        assert headers["content-type"] == "application/json"
        assert genuine(data, headers["x-apiyi-proxy-signature"], SECRET)
        assert not genuine(data, headers["x-apiyi-proxy-signature"], SECRET + "x")
    bodies = sorted(receiver.bodies(), key=lambda b: b["threshold"])
    assert [b["threshold"] for b in bodies] == [50, 80, 100]
    for body in bodies:
        assert set(body) == FIXED_FIELDS | {"period_start"}
        assert body["type"] == "budget.threshold"
        assert (body["scope"], body["id"], body["name"]) == ("key", key_id, "design-bot")
        assert (body["period"], body["period_start"]) == ("day", today())
        assert body["limit_usd"] == 0.3
        # The amount that crossed: at least the threshold, at most the whole budget.
        assert body["threshold"] / 100 * 0.3 <= body["spent_usd"] + 1e-9 <= 0.3 + 1e-9
        sent = datetime.fromisoformat(body["time"].replace("Z", "+00:00"))
        assert abs((datetime.now(UTC) - sent).total_seconds()) < 60
    assert sum(counted(r, "delivered") for r in replicas) == 3

    # The marks live beside the usage, under the key's hash tag, and expire after the day.
    store = redis.Redis.from_url(redis_server.url, decode_responses=True)
    mark = f"apiyi:{{{group_of_key(key_id, None)}}}:alerted:key:{key_id}:{today()}"
    assert sorted(store.hkeys(mark)) == ["100", "50", "80"]
    assert 86_400 < store.ttl(mark) <= 2 * 86_400
    store.close()

    # Spending on after 100 %: the budget refuses, and nothing is sent again.
    refused = asyncio.run(fire([r.url for r in replicas], key, 3))
    assert [a.status_code for a in refused] == [429] * 3
    time.sleep(0.5)
    assert len(receiver.records) == 3


def test_team_and_monthly_budgets_name_their_scope_and_period(
    proxy_process: Callable[..., ProxyProcess],
    redis_server: RedisServer,
    upstream: ThreadServer,
    receiver: Receiver,
) -> None:
    env = env_for(upstream, [json_hook(receiver)], redis_server.url, thresholds="[50, 100]")
    replicas = [proxy_process(env) for _ in range(2)]
    team = httpx.post(
        replicas[0].url + "/admin/teams", json={"name": "design", "daily_usd": 0.06}, headers=ADMIN
    )
    assert team.status_code in (200, 201), team.text
    key, key_id = create_key(replicas[0], team="design", monthly_usd=0.06)

    for replica in replicas:  # one image each: 50 %, then 100 % of both budgets
        assert asyncio.run(fire([replica.url], key, 1))[0].status_code == 200
    receiver.wait_for(4)
    time.sleep(1.0)
    seen = sorted(
        (b["scope"], b["id"], b["name"], b["period"], b["period_start"], b["threshold"])
        for b in receiver.bodies()
    )
    month = today()[:7] + "-01"
    assert seen == [
        ("key", key_id, "bot", "month", month, 50),
        ("key", key_id, "bot", "month", month, 100),
        ("team", "design", "design", "day", today(), 50),
        ("team", "design", "design", "day", today(), 100),
    ]
    team_bodies = [b for b in receiver.bodies() if b["scope"] == "team"]
    assert {b["limit_usd"] for b in team_bodies} == {0.06}


def test_a_settle_written_after_a_store_stall_is_still_checked(
    proxy_process: Callable[..., ProxyProcess],
    redis_server: RedisServer,
    upstream: ThreadServer,
    receiver: Receiver,
) -> None:
    env = env_for(upstream, [json_hook(receiver)], redis_server.url, thresholds="[100]")
    proxy = proxy_process(env)
    key, key_id = create_key(proxy, daily_usd=0.03)
    call = threading.Thread(
        target=lambda: answers.append(
            httpx.post(
                proxy.url + "/v1/images/generations",
                json={"prompt": "[fake:latency=1.5] p", "response_format": "url"},
                headers={"authorization": f"Bearer {key}"},
                timeout=30,
            )
        )
    )
    answers: list[httpx.Response] = []
    call.start()
    time.sleep(0.7)  # reserved; the upstream is still drawing
    redis_server.pause()
    try:
        call.join(10)  # its settle found the store stalled and was queued
        assert [a.status_code for a in answers] == [200]
        time.sleep(0.5)
        assert receiver.records == []
    finally:
        redis_server.resume()
    receiver.wait_for(1)  # the queued settle was written, then checked
    body = receiver.bodies()[0]
    assert (body["id"], body["threshold"], body["spent_usd"]) == (key_id, 100, 0.03)


# one process, memory store ---------------------------------------------------------------


def test_a_memory_store_process_alerts_each_threshold_once(
    proxy_process: Callable[..., ProxyProcess], upstream: ThreadServer, receiver: Receiver
) -> None:
    proxy = proxy_process(env_for(upstream, [json_hook(receiver)]))
    key, key_id = create_key(proxy, daily_usd=0.09)  # 3 images
    no_budget, _ = create_key(proxy)  # no limit: never an alert

    for _ in range(2):
        assert asyncio.run(fire([proxy.url], no_budget, 1))[0].status_code == 200
    assert asyncio.run(fire([proxy.url], key, 1))[0].status_code == 200  # 33 %
    time.sleep(0.5)
    assert receiver.records == []
    assert asyncio.run(fire([proxy.url], key, 1))[0].status_code == 200  # 67 %
    receiver.wait_for(1)
    assert [b["threshold"] for b in receiver.bodies()] == [50]
    assert asyncio.run(fire([proxy.url], key, 1))[0].status_code == 200  # 100 %
    receiver.wait_for(3)
    assert asyncio.run(fire([proxy.url], key, 2))[0].status_code == 429
    time.sleep(0.5)
    bodies = receiver.bodies()
    assert sorted(b["threshold"] for b in bodies) == [50, 80, 100]
    assert {(b["id"], b["spent_usd"]) for b in bodies[1:]} == {(key_id, 0.09)}


# delivery --------------------------------------------------------------------------------


def test_a_failing_receiver_gets_the_same_signed_body_until_it_accepts(
    proxy_process: Callable[..., ProxyProcess], upstream: ThreadServer, receiver: Receiver
) -> None:
    receiver.fail_first = 2
    proxy = proxy_process(env_for(upstream, [json_hook(receiver)], thresholds="[50]"))
    key, _ = create_key(proxy, daily_usd=0.06)
    assert asyncio.run(fire([proxy.url], key, 1))[0].status_code == 200
    receiver.wait_for(3)
    time.sleep(0.5)
    assert len(receiver.records) == 3  # two 500s, then delivered: no fourth attempt
    assert len({data for _, data in receiver.records}) == 1
    assert len({h["x-apiyi-proxy-signature"] for h, _ in receiver.records}) == 1
    assert counted(proxy, "delivered") == 1
    assert counted(proxy, "failed") == 0


def test_a_dead_receiver_is_given_up_after_the_bound_and_never_slows_a_call(
    proxy_process: Callable[..., ProxyProcess], upstream: ThreadServer, receiver: Receiver
) -> None:
    receiver.hang = 2.0  # every attempt times out (then would be a 500)
    env = env_for(upstream, [json_hook(receiver)], max_attempts="3", timeout_seconds="0.3")
    proxy = proxy_process(env)
    key, key_id = create_key(proxy, daily_usd=0.09)

    for _ in range(3):  # 33 %, 67 %, 100 %: three alerts, every attempt hanging
        started = time.monotonic()
        assert asyncio.run(fire([proxy.url], key, 1))[0].status_code == 200
        assert time.monotonic() - started < 1.0
    deadline = time.monotonic() + 15
    while counted(proxy, "failed") < 3:
        assert time.monotonic() < deadline, proxy.output()
        time.sleep(0.1)
    time.sleep(0.5)
    assert len(receiver.records) == 3 * 3  # three alerts, three attempts each
    assert counted(proxy, "failed") == 3 and counted(proxy, "delivered") == 0

    log = proxy.output()
    given_up = [line for line in log.splitlines() if "given up after 3 attempts" in line]
    assert len(given_up) == 3, log
    assert all(key_id in line and "127.0.0.1" in line for line in given_up)
    assert URL_TOKEN not in log and SECRET not in log


def test_slack_format_posts_a_readable_text_line(
    proxy_process: Callable[..., ProxyProcess], upstream: ThreadServer, receiver: Receiver
) -> None:
    slack = Receiver()
    try:
        hooks = [{"url": slack.url, "format": "slack"}, json_hook(receiver)]
        proxy = proxy_process(env_for(upstream, hooks, thresholds="[80]"))
        key, key_id = create_key(proxy, name="poster", daily_usd=0.03)
        assert asyncio.run(fire([proxy.url], key, 1))[0].status_code == 200
        slack.wait_for(1)
        receiver.wait_for(1)  # every webhook gets every alert
        headers, data = slack.records[0]
        body = json.loads(data)
        assert list(body) == ["text"]
        assert body["text"] == (
            f'apiyi-proxy: Key "poster" ({key_id}) reached 80% of its daily budget '
            f"({today()}): $0.03 spent of $0.03."
        )
        assert "x-apiyi-proxy-signature" not in headers  # no secret given to it
        assert receiver.bodies()[0]["threshold"] == 80
    finally:
        slack.close()


# the store decides, once -----------------------------------------------------------------

PERIODS = Periods("2026-11-23", "2026-11")
THRESHOLDS = ("50", "80", "100")
_prefixes = iter(range(1_000_000))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        backend: Store = MemoryStore()
    else:
        name = "redis_server" if request.param == "redis" else "redis_cluster"
        server = request.getfixturevalue(name)
        settings = StoreSettings(url=server.url, key_prefix=f"alerts{next(_prefixes)}")
        backend = RedisStore.from_settings(settings)
        await backend.open()
    yield backend
    await backend.close()


def spend(key: KeyRecord, n: int) -> HoldRequest:
    return HoldRequest(
        hold_id=f"h{n}-{time.monotonic_ns()}@{group_of_key(key.id, key.team)}",
        key_id=key.id,
        amount=30_000,
        periods=PERIODS,
        ttl_seconds=60,
        model="gpt-image-2-vip",
        team=key.team,
    )


async def take(store: Store, key: KeyRecord, n: int, keep: bool = True) -> HoldRequest:
    request = spend(key, n)
    assert (await store.reserve(request)).ok
    if keep:
        await store.settle(request.hold_id, request.amount)
    return request


@pytest.mark.anyio
async def test_the_store_reports_each_crossing_once_from_spent_money(store: Store) -> None:
    hasher = KeyHasher("pepper")
    _, key = issue_key(hasher, "k", team="ops", limits=Limits(daily_micros=100_000))
    await store.put_team(Team("ops", Limits(monthly_micros=60_000)))
    await store.add_key(key)

    # Held money is not spent: 50 % of the team's month held crosses nothing.
    held = await take(store, key, 1, keep=False)
    assert await store.cross_thresholds(held, THRESHOLDS) == []

    await store.settle(held.hold_id, held.amount)  # 30 % of the key's day, 50 % of the team's
    first = await store.cross_thresholds(held, THRESHOLDS)
    assert [Crossing("team", "ops", "ops", "month", "2026-11", "50", 30_000, 60_000)] == first
    assert await store.cross_thresholds(held, THRESHOLDS) == []  # asked again: nothing new

    last = await take(store, key, 2)  # 60 % of the key's day, 100 % of the team's month
    crossings = {
        (c.scope, c.kind, c.threshold) for c in await store.cross_thresholds(last, THRESHOLDS)
    }
    assert crossings == {("key", "day", "50"), ("team", "month", "80"), ("team", "month", "100")}
    assert await store.cross_thresholds(last, THRESHOLDS) == []


@pytest.mark.anyio
async def test_a_budget_of_zero_or_none_has_no_thresholds(store: Store) -> None:
    hasher = KeyHasher("pepper")
    _, open_key = issue_key(hasher, "open")
    await store.add_key(open_key)
    request = await take(store, open_key, 1)
    assert await store.cross_thresholds(request, THRESHOLDS) == []

    _, frozen = issue_key(hasher, "frozen", limits=Limits(daily_micros=0, monthly_micros=0))
    await store.add_key(frozen)
    # A spend booked for a key whose budget was set to 0 after its hold: still no alert.
    await store.settle(f"gone@{group_of_key(frozen.id, None)}", 30_000, request=spend(frozen, 2))
    assert await store.cross_thresholds(spend(frozen, 3), THRESHOLDS) == []


# the pure parts ----------------------------------------------------------------------------


def test_payload_of_a_fractional_monthly_threshold() -> None:
    crossing = Crossing("team", "ops", "ops", "month", "2026-11", "33.3", 1_000_000, 3_000_000)
    sent = alerts.payload(crossing, datetime(2026, 11, 5, 8, 30, 1, 999, tzinfo=UTC))
    assert sent == {
        "type": "budget.threshold",
        "scope": "team",
        "id": "ops",
        "name": "ops",
        "period": "month",
        "threshold": 33.3,
        "spent_usd": 1.0,
        "limit_usd": 3.0,
        "time": "2026-11-05T08:30:01Z",
        "period_start": "2026-11-01",
    }
    assert alerts.slack_text(crossing) == (
        'apiyi-proxy: Team "ops" reached 33.3% of its monthly budget (2026-11): '
        "$1.00 spent of $3.00."
    )
    hook = config.WebhookSettings(url="http://x/", secret="s")
    data = alerts.body(hook, crossing, datetime.now(UTC))
    assert (
        alerts.signature("s", data) == "sha256=" + hmac.new(b"s", data, hashlib.sha256).hexdigest()
    )


@pytest.mark.parametrize(
    ("status", "again"), [(500, True), (503, True), (429, True), (400, False), (404, False)]
)
def test_only_a_failing_or_busy_receiver_is_tried_again(status: int, again: bool) -> None:
    assert alerts.retryable(status) is again


# configuration ---------------------------------------------------------------------------


def load(env: dict[str, str]) -> config.Settings:
    return config.load(path="/dev/null", env=env)


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ("[50, 50]", "alerts.thresholds: must be sorted, each percentage once"),
        ("[80, 50]", "alerts.thresholds: must be sorted, each percentage once"),
        ("[0, 50]", "alerts.thresholds[0]: must be a percentage in (0, 1000], got 0"),
        ("[50, 1000.5]", "alerts.thresholds[1]: must be a percentage in (0, 1000], got 1000.5"),
        ("[fifty]", "alerts.thresholds[0]: must be a number, got 'fifty'"),
    ],
)
def test_thresholds_are_validated_naming_the_field(thresholds: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as error:
        load({"APIYI_PROXY_ALERTS__THRESHOLDS": thresholds})
    assert str(error.value) == message


def test_webhook_secrets_come_from_the_environment_and_are_never_shown() -> None:
    hook = '[{url: "https://hooks.example.com/services/T0KEN", secret_env: HOOK_SECRET}]'
    s = load({"APIYI_PROXY_ALERTS__WEBHOOKS": hook, "HOOK_SECRET": SECRET})
    assert s.alerts.webhooks[0].secret == SECRET
    assert s.alerts.thresholds == (50.0, 80.0, 100.0)
    shown = repr(s) + repr(s.masked())
    assert SECRET not in shown and "T0KEN" not in shown
    assert s.masked()["alerts"]["webhooks"][0]["url"] == "https://hooks.example.com/***"

    with pytest.raises(config.ConfigError, match=r"alerts.webhooks\[0\].secret_env: HOOK_SECRET"):
        load({"APIYI_PROXY_ALERTS__WEBHOOKS": hook})
    unsigned = '[{url: "https://hooks.example.com/x"}]'
    with pytest.raises(config.ConfigError, match=r"alerts.webhooks\[0\].secret: a json webhook"):
        load({"APIYI_PROXY_ALERTS__WEBHOOKS": unsigned})
    bad_url = '[{url: "ftp://x/y", format: slack}]'
    with pytest.raises(config.ConfigError, match=r"alerts.webhooks\[0\].url: must be an http"):
        load({"APIYI_PROXY_ALERTS__WEBHOOKS": bad_url})
