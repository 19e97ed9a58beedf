"""The upstream account: the fake serves it from its billing log, the proxy polls it,
exports balance and usage, and reconciles the upstream's usage with the ledger.

Everything runs as real processes: ``apiyi-proxy fake-upstream`` and ``apiyi-proxy
serve`` on a private Redis, polling every 0.2 s.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.account import Account, PollFailed

from .conftest import (
    ADMIN_TOKEN,
    ROOT,
    UPSTREAM_KEY,
    ProxyProcess,
    RedisServer,
    free_port,
    generate_at,
    process_env,
)
from .test_prometheus_scrape import ALERTS, Prometheus

POLL = 0.2
PRICE = 0.03
BALANCE = "apiyi_proxy_upstream_balance_usd"
USAGE = "apiyi_proxy_upstream_usage_usd"
DRIFT = "apiyi_proxy_upstream_drift_usd"
FAILURES = "apiyi_proxy_upstream_account_poll_failures_total"
ACCOUNT_FAMILIES = (BALANCE, USAGE, DRIFT)
SUBSCRIPTION = "/v1/dashboard/billing/subscription"
USAGE_PATH = "/v1/dashboard/billing/usage"


class FakeProcess:
    """``apiyi-proxy fake-upstream`` as a child process."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "proxy", "fake-upstream", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, "--api-key", UPSTREAM_KEY, *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            assert self.process.poll() is None, "fake-upstream exited"
            try:
                if httpx.get(self.url + "/_fake/billing", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                assert time.monotonic() < deadline, "fake-upstream did not start"
                time.sleep(0.05)

    def get(self, path: str, key: str = UPSTREAM_KEY) -> httpx.Response:
        return httpx.get(self.url + path, headers={"authorization": f"Bearer {key}"}, timeout=5)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = httpx.post(self.url + path, json=body, timeout=5)
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result

    def billing(self) -> dict[str, Any]:
        log: dict[str, Any] = httpx.get(self.url + "/_fake/billing", timeout=5).json()
        return log

    def stop(self) -> None:
        # Killed: its calls that "never answer" would hold a graceful stop for an hour.
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def fake_upstream() -> Iterator[Callable[..., FakeProcess]]:
    started: list[FakeProcess] = []

    def start(*args: str) -> FakeProcess:
        started.append(FakeProcess(*args))
        return started[-1]

    yield start
    for fake in started:
        fake.stop()


def proxy_env(fake: FakeProcess, redis: RedisServer, **extra: str) -> dict[str, str]:
    own = {
        "APIYI_PROXY_STORE_URL": redis.url,
        "APIYI_PROXY_UPSTREAM__ACCOUNT_POLL_SECONDS": str(POLL),
        "APIYI_PROXY_LOG__FORMAT": "json",
    }
    return process_env(fake.url, **{**own, **extra})


def scrape(proxy: ProxyProcess) -> tuple[str, dict[str, list[float]]]:
    """The exposition, and the values of every family (none for a family without samples)."""
    text = httpx.get(proxy.url + "/metrics", timeout=5).text
    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        values[name] = [sample.value for sample in family.samples]
    return text, values


def wait_for(proxy: ProxyProcess, ready: Callable[[dict[str, list[float]]], bool]) -> None:
    deadline = time.monotonic() + 15
    while True:
        _, values = scrape(proxy)
        if ready(values):
            return
        assert time.monotonic() < deadline, values
        time.sleep(0.05)


def account_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in proxy.output().splitlines() if line.startswith("{")]
    return [line for line in lines if line["logger"] == "apiyi_proxy.account"]


def post(proxy: ProxyProcess, key: str, prompt: str = "a lighthouse", **body: Any) -> int:
    answer = httpx.post(
        proxy.url + "/v1/images/generations",
        json={"prompt": prompt, "response_format": "url", **body},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    return answer.status_code


def settled_and_polled(proxy: ProxyProcess, usage_usd: float) -> dict[str, list[float]]:
    """Waits until no hold is open and a poll has read ``usage_usd``, then for two more
    polls, so that the drift read is that of a poll after every settle."""
    wait_for(
        proxy,
        lambda v: (
            v["apiyi_proxy_holds_outstanding"] == [0.0]
            and v[USAGE] == [pytest.approx(usage_usd, abs=1e-9)]
        ),
    )
    time.sleep(3 * POLL)
    return scrape(proxy)[1]


# reading the answers -------------------------------------------------------------------


def test_an_account_is_read_in_micro_usd_from_both_answers() -> None:
    account = Account.of({"hard_limit_usd": 100}, {"total_usage": 2500.5})
    assert (account.quota, account.usage, account.balance) == (100_000_000, 25_005_000, 74_995_000)


@pytest.mark.parametrize("value", [None, True, "100", float("nan"), float("inf"), [1]])
def test_an_answer_without_a_finite_number_is_a_failed_poll(value: Any) -> None:
    with pytest.raises(PollFailed, match="hard_limit_usd"):
        Account.of({"hard_limit_usd": value}, {"total_usage": 0})
    with pytest.raises(PollFailed, match="total_usage"):
        Account.of({"hard_limit_usd": 1}, {"total_usage": value})


# the fake's account --------------------------------------------------------------------


def test_the_fake_serves_its_account_from_its_billing_log(
    fake_upstream: Callable[..., FakeProcess],
) -> None:
    fake = fake_upstream("--balance-usd", "12.5")
    assert fake.get(SUBSCRIPTION).json()["hard_limit_usd"] == 12.5
    assert fake.get(USAGE_PATH).json() == {"object": "list", "total_usage": 0.0}
    assert fake.get(SUBSCRIPTION, key="sk-someone-else").status_code == 401
    assert fake.get(USAGE_PATH, key="sk-someone-else").status_code == 401

    headers = {"authorization": f"Bearer {UPSTREAM_KEY}"}
    url = fake.url + "/v1/images/generations"
    ok = httpx.post(url, json={"model": "gpt-image-2-vip", "prompt": "a", "n": 2}, headers=headers)
    assert ok.status_code == 200
    failed = {"model": "gpt-image-2-vip", "prompt": "[fake:500] a"}
    assert httpx.post(url, json=failed, headers=headers).status_code == 500
    # A call the client gave up on is billed all the same.
    with pytest.raises(httpx.ReadTimeout):
        timeout = {"model": "gpt-image-2-all", "prompt": "[fake:timeout] a"}
        httpx.post(url, json=timeout, headers=headers, timeout=0.5)
    unrequested = fake.post("/_fake/bill", {"images": 4})
    assert unrequested["images_billed"] == 2 + 1 + 4
    assert unrequested["requests"][-1]["route"] == "unrequested"

    # 7 images at $0.03, in 0.01 USD.
    assert fake.get(USAGE_PATH).json()["total_usage"] == pytest.approx(7 * 3)
    assert fake.get(SUBSCRIPTION).json()["hard_limit_usd"] == 12.5


def test_a_fake_without_account_endpoints_answers_404(
    fake_upstream: Callable[..., FakeProcess],
) -> None:
    fake = fake_upstream("--no-account")
    for path in (SUBSCRIPTION, USAGE_PATH):
        answer = fake.get(path)
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "not_found"


# the proxy's reconciliation --------------------------------------------------------------


def test_drift_is_zero_after_successes_refusals_failures_and_timeouts(
    fake_upstream: Callable[..., FakeProcess],
    redis_server: RedisServer,
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    fake = fake_upstream("--balance-usd", "50")
    env = proxy_env(
        fake,
        redis_server,
        APIYI_PROXY_UPSTREAM__READ_TIMEOUT="1",
        APIYI_PROXY_UPSTREAM__TOTAL_TIMEOUT_SECONDS="1",
    )
    proxy = proxy_process(env)
    # The first poll sets the baseline: nothing used yet, nothing drifted.
    wait_for(proxy, lambda v: v[BALANCE] == [50.0] and v[DRIFT] == [0.0])
    key = proxy.new_key("mixed")

    prompts = ["a", "b", "c", "[fake:timeout] d", "[fake:latency=5] e", "[fake:500] f"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        statuses = list(pool.map(lambda p: post(proxy, key, p), prompts))
    assert statuses == [200, 200, 200, 504, 504, 502]
    assert post(proxy, key, n=3) == 400  # refused by the proxy: never sent upstream
    assert post(proxy, key, model="gpt-image-2-all") == 200

    log = fake.billing()
    assert [r["n"] for r in log["requests"]] == [None] * 7
    billed = log["images_billed"]
    assert billed == 3 + 2 + 1  # the timeouts are billed, the 5xx is not
    values = settled_and_polled(proxy, billed * PRICE)
    assert values[DRIFT] == [0.0]
    assert values[BALANCE] == [pytest.approx(50 - billed * PRICE, abs=1e-9)]
    assert values[USAGE] == [pytest.approx(billed * PRICE, abs=1e-9)]
    assert values[FAILURES] == [0.0]
    # The ledger, on its side, booked the timeouts as uncertain spend.
    assert sum(values["apiyi_proxy_uncertain_spend_usd_total"]) == pytest.approx(2 * PRICE)

    text, _ = scrape(proxy)
    assert UPSTREAM_KEY not in text
    assert UPSTREAM_KEY not in proxy.output()
    assert account_lines(proxy) == []  # polls that work are silent


def test_what_the_upstream_bills_without_a_request_shows_as_drift(
    fake_upstream: Callable[..., FakeProcess],
    redis_server: RedisServer,
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    fake = fake_upstream("--balance-usd", "20")
    # Spend before the proxy's first poll is outside its window: not drift.
    fake.post("/_fake/bill", {"images": 10})
    proxy = proxy_process(proxy_env(fake, redis_server))
    wait_for(proxy, lambda v: v[DRIFT] == [0.0] and v[USAGE] == [pytest.approx(0.3)])
    key = proxy.new_key("drifting")
    assert [post(proxy, key) for _ in range(2)] == [200, 200]
    settled_and_polled(proxy, 12 * PRICE)
    assert scrape(proxy)[1][DRIFT] == [0.0]

    fake.post("/_fake/bill", {"images": 4})
    values = settled_and_polled(proxy, 16 * PRICE)
    assert values[DRIFT] == [pytest.approx(4 * PRICE, abs=1e-9)]
    assert values[BALANCE] == [pytest.approx(20 - 16 * PRICE, abs=1e-9)]

    # A second replica on the same store, started now, reads its own window from here.
    other = proxy_process(proxy_env(fake, redis_server))
    wait_for(other, lambda v: v[DRIFT] == [0.0])
    assert generate_at(other.url, key).status_code == 200  # served by the second replica
    # The first replica's ledger side is the store's: the other replica's call is booked.
    values = settled_and_polled(proxy, 17 * PRICE)
    assert values[DRIFT] == [pytest.approx(4 * PRICE, abs=1e-9)]
    assert scrape(other)[1][DRIFT] == [0.0]


def test_an_upstream_without_account_endpoints_is_not_polled(
    fake_upstream: Callable[..., FakeProcess],
    redis_server: RedisServer,
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    fake = fake_upstream("--no-account")
    proxy = proxy_process(proxy_env(fake, redis_server))
    key = proxy.new_key("plain")
    assert post(proxy, key) == 200
    deadline = time.monotonic() + 10
    while not account_lines(proxy):
        assert time.monotonic() < deadline, proxy.output()
        time.sleep(0.05)
    time.sleep(10 * POLL)  # ten more intervals: nothing more is said, nothing polled

    [line] = account_lines(proxy)
    assert line["level"] == "info"
    assert "does not serve" in line["msg"] and "404" in line["msg"]
    text, values = scrape(proxy)
    for family in ACCOUNT_FAMILIES:
        assert values[family] == [], family  # declared, never a value
    assert values[FAILURES] == [0.0]
    assert sum(values["apiyi_proxy_store_errors_total"]) == 0
    assert not any(line["level"] == "error" for line in map(orjson.loads, _json(proxy)))
    assert post(proxy, key) == 200
    assert UPSTREAM_KEY not in text


def test_failing_polls_are_counted_logged_once_and_never_show_the_key(
    fake_upstream: Callable[..., FakeProcess],
    redis_server: RedisServer,
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    fake = fake_upstream()
    # The fake repeats the bearer and its address in every field of every error.
    fake.post("/_fake/config", {"echo_secrets": True})
    wrong = "sk-" + "NotTheAccountsKeyButSecretToo" + "0123456789"
    proxy = proxy_process({**proxy_env(fake, redis_server), "APIYI_API_KEY": wrong})
    wait_for(proxy, lambda v: sum(v[FAILURES]) >= 5)  # polling goes on

    [line] = account_lines(proxy)
    assert line["level"] == "warning"
    assert "status 401" in line["msg"]
    text, values = scrape(proxy)
    for family in ACCOUNT_FAMILIES:
        assert values[family] == [], family
    for secret in (wrong, UPSTREAM_KEY):
        assert secret not in proxy.output()
        assert secret not in text
    # The start-up banner names the upstream; what the upstream said about it is not repeated.
    assert str(fake.port) not in line["msg"]


def test_passthrough_mode_does_not_poll(
    fake_upstream: Callable[..., FakeProcess],
    redis_server: RedisServer,
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    fake = fake_upstream()
    env = {**proxy_env(fake, redis_server), "APIYI_PROXY_AUTH_MODE": "passthrough"}
    proxy = proxy_process(env)
    time.sleep(5 * POLL)
    [line] = account_lines(proxy)
    assert "passthrough" in line["msg"]
    _, values = scrape(proxy)
    assert all(values[family] == [] for family in ACCOUNT_FAMILIES)


def test_poll_interval_is_validated_naming_the_field(tmp_path: Any) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump({"upstream": {"account_poll_seconds": -1}}))
    checked = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 2
    assert "upstream.account_poll_seconds: must be >= 0" in checked.stderr


def _json(proxy: ProxyProcess) -> list[str]:
    return [line for line in proxy.output().splitlines() if line.startswith("{")]


# the alert rules, against a real Prometheus ----------------------------------------------


def test_a_real_scrape_makes_the_balance_and_drift_alert_expressions_positive(
    proxy_process: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    """``serve --fake-upstream`` bills at the proxy's own prices (here $0.10 an image):
    its calls drift nothing, twenty images billed behind the proxy's back drift $2.00,
    and the balance falls fast enough to run out within a day."""
    config = tmp_path / "proxy.yaml"
    models = [{"name": "gpt-image-2-vip", "price_usd": 0.1}, {"name": "gpt-image-2-all"}]
    config.write_text(yaml.safe_dump({"policy": {"models": models}}))
    env = {
        "APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN,
        "APIYI_PROXY_UPSTREAM__ACCOUNT_POLL_SECONDS": str(POLL),
    }
    proxy = proxy_process(env, ["--fake-upstream", "--config", str(config)])
    key = proxy.new_key("scraped")
    assert [post(proxy, key) for _ in range(3)] == [200, 200, 200]
    settled_and_polled(proxy, 0.3)
    assert scrape(proxy)[1][DRIFT] == [0.0]

    rules = {
        rule["alert"]: rule
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }
    balance_rule = rules["ApiyiProxyUpstreamBalanceRunsOutWithinADay"]
    drift_rule = rules["ApiyiProxyUpstreamBillingDrift"]
    prometheus = Prometheus([f"127.0.0.1:{proxy.port}"])
    try:
        seen = f"count_over_time({BALANCE}[1m]) >= 3"
        prometheus.wait(lambda: prometheus.query(seen), 20)
        assert prometheus.query(balance_rule["expr"]) == []
        assert prometheus.query(drift_rule["expr"]) == []

        bill = httpx.post(proxy.url + "/_fake_upstream/_fake/bill", json={"images": 20})
        assert bill.status_code == 200, bill.text
        drifted = f"{DRIFT} > 1.99"
        prometheus.wait(lambda: prometheus.query(drifted), 20)
        for rule in (balance_rule, drift_rule):
            [result] = prometheus.query(rule["expr"])
            assert result["metric"]["instance"] == f"127.0.0.1:{proxy.port}"
        [drift] = prometheus.query(drift_rule["expr"])
        assert float(drift["value"][1]) == pytest.approx(2.0)
        [predicted] = prometheus.query(balance_rule["expr"])
        assert float(predicted["value"][1]) < 0
    finally:
        prometheus.stop()
