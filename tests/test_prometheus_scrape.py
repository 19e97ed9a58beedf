"""A real Prometheus scraping real proxy processes, evaluating the project's alert rules.

Prometheus (the Debian package; ``.ci/run`` installs it) scrapes every second and
evaluates deploy/prometheus/alerts.yml every second. Two proxies serve the built-in
fake upstream: one on a memory store for money and the upstream's refusals, one on a
private Redis that the last test stops.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import ADMIN_TOKEN, ROOT, ProxyProcess, RedisServer, free_port

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PEPPER = "pepper-for-tests-0123456789abcdef"
VIP = "gpt-image-2-vip"
# 0.1 added three times as floats is 0.30000000000000004.
PRICES = [{"name": VIP, "price_usd": 0.1}, {"name": "gpt-image-2-all", "price_usd": 0.2}]


class Prometheus:
    """``prometheus`` on an unused port, scraping ``targets`` every second."""

    def __init__(self, targets: list[str]) -> None:
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        if not Path(binary).exists():
            pytest.fail("prometheus is not installed: apt-get install prometheus (.ci/run does)")
        self.dir = Path(tempfile.mkdtemp(prefix="prometheus-test-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": "apiyi-proxy", "static_configs": [{"targets": targets}]}
            ],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (self.dir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait(lambda: httpx.get(self.url + "/-/ready", timeout=1).status_code == 200, 30)

    def wait(self, ready: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                pytest.fail("prometheus exited:\n" + (self.dir / "prometheus.log").read_text())
            try:
                found = ready()
            except httpx.HTTPError:
                found = None
            if found:
                return found
            if time.monotonic() > deadline:
                pytest.fail(f"not seen within {timeout} s")
            time.sleep(0.1)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr} if at is None else {"query": expr, "time": str(at)}
        answer = httpx.get(self.url + "/api/v1/query", params=params, timeout=5).json()
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def alert(self, name: str) -> dict[str, Any] | None:
        answer = httpx.get(self.url + "/api/v1/alerts", timeout=5).json()
        found = [a for a in answer["data"]["alerts"] if a["labels"]["alertname"] == name]
        return found[0] if found else None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Stack:
    def __init__(self, money: ProxyProcess, stored: ProxyProcess, redis: RedisServer) -> None:
        self.money = money
        self.stored = stored
        self.redis = redis
        self.prometheus = Prometheus([instance(money), instance(stored)])

    def key(self, proxy: ProxyProcess) -> str:
        return proxy.new_key("scraped")

    def scraped_twice(self, proxy: ProxyProcess, name: str, **labels: str) -> None:
        """Wait until Prometheus holds two samples of ``name`` (at 0) from ``proxy``."""
        matchers = ",".join(
            f'{k}="{v}"' for k, v in {"instance": instance(proxy), **labels}.items()
        )
        expr = f"count_over_time({name}{{{matchers}}}[1m]) >= 2"
        self.prometheus.wait(lambda: self.prometheus.query(expr), 20)


def instance(proxy: ProxyProcess) -> str:
    return f"127.0.0.1:{proxy.port}"


def config_file(directory: Path, name: str, store: str) -> str:
    path = directory / name
    settings = {"policy": {"models": PRICES}, "store": {"url": store}}
    path.write_text(yaml.safe_dump(settings))
    return str(path)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    directory = Path(tempfile.mkdtemp(prefix="scrape-config-"))
    env = {"APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN, "APIYI_PROXY_KEY_PEPPER": PEPPER}
    redis = RedisServer()
    started: list[ProxyProcess] = []
    made: Stack | None = None
    try:
        for name, store in (("money.yaml", "memory://"), ("stored.yaml", redis.url)):
            args = ["--fake-upstream", "--config", config_file(directory, name, store)]
            started.append(ProxyProcess(env, args))
        made = Stack(started[0], started[1], redis)
        yield made
    finally:
        if made is not None:
            made.prometheus.stop()
        for proxy in started:
            proxy.stop()
        redis.stop()
        shutil.rmtree(directory, ignore_errors=True)


def generate(proxy: ProxyProcess, key: str, prompt: str = "a lighthouse") -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/images/generations",
        json={"prompt": prompt, "response_format": "url"},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def test_spend_increase_over_a_window_is_exactly_what_was_spent(stack: Stack) -> None:
    proxy, prometheus = stack.money, stack.prometheus
    spend = f'apiyi_proxy_spend_usd_total{{instance="{instance(proxy)}",model="{VIP}"}}'
    stack.scraped_twice(proxy, "apiyi_proxy_spend_usd_total")
    key = stack.key(proxy)
    for _ in range(3):
        assert generate(proxy, key).status_code == 200
    prometheus.wait(lambda: prometheus.query(f"{spend} > 0"), 10)

    exact = prometheus.query(f"sum(max_over_time({spend}[1m]) - min_over_time({spend}[1m]))")
    assert exact[0]["value"][1] == "0.3"
    # increase() sees the first step too; it extrapolates past the last sample by up to
    # half a scrape interval, a large share of the few seconds this series has lived.
    increase = float(prometheus.query(f"sum(increase({spend}[1m]))")[0]["value"][1])
    assert 0.3 <= increase < 0.45


def test_a_quota_refusal_from_the_upstream_fires_the_quota_alert(stack: Stack) -> None:
    proxy, prometheus = stack.money, stack.prometheus
    stack.scraped_twice(proxy, "apiyi_proxy_upstream_calls_total", outcome="quota")
    assert prometheus.alert("ApiyiProxyUpstreamQuotaExhausted") is None
    refused = generate(proxy, stack.key(proxy), "[fake:quota] a lighthouse")
    assert refused.status_code == 502
    assert refused.json()["error"]["code"] == "upstream_quota_exhausted"
    started = time.monotonic()

    def firing() -> bool:
        alert = prometheus.alert("ApiyiProxyUpstreamQuotaExhausted")
        return alert is not None and alert["state"] == "firing"

    # One scrape and one evaluation: seconds here, under a minute at 15 s intervals.
    prometheus.wait(firing, 10)
    assert time.monotonic() - started < 10
    assert "out of quota" in proxy.output()


def test_the_first_store_error_makes_the_store_errors_alert_expression_positive(
    stack: Stack,
) -> None:
    proxy, prometheus = stack.stored, stack.prometheus
    key = stack.key(proxy)
    assert generate(proxy, key).status_code == 200
    errors = f'apiyi_proxy_store_errors_total{{instance="{instance(proxy)}"}}'
    stack.scraped_twice(proxy, "apiyi_proxy_store_errors_total")
    assert prometheus.query(f"sum({errors}) > 0") == []

    stack.redis.stop()
    assert generate(proxy, key).status_code == 503

    # The first scrape that saw an error, and the rule evaluated at that very moment.
    def first_error_scrape() -> float | None:
        samples: dict[float, float] = {}
        for series in prometheus.query(f"{errors}[1m]"):
            for at, count in series["values"]:
                samples[float(at)] = samples.get(float(at), 0.0) + float(count)
        seen = sorted(at for at, count in samples.items() if count > 0)
        return seen[0] if seen else None

    at = prometheus.wait(first_error_scrape, 10)
    rules = yaml.safe_load(ALERTS.read_text())
    [rule] = [
        r for g in rules["groups"] for r in g["rules"] if r["alert"] == "ApiyiProxyStoreErrors"
    ]
    assert rule["labels"]["severity"] == "critical"
    positive = [
        r
        for r in prometheus.query(rule["expr"], at=at)
        if r["metric"]["instance"] == instance(proxy)
    ]
    assert positive and all(float(r["value"][1]) > 0 for r in positive)

    def pending() -> bool:
        alert = prometheus.alert("ApiyiProxyStoreErrors")
        return alert is not None and alert["state"] in ("pending", "firing")

    prometheus.wait(pending, 10)
