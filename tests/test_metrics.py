"""``/metrics`` after real traffic: every family carries the values the traffic implies."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import EXPORTED_NAMES

from .conftest import UPSTREAM_KEY, Proxy, billing

GENERATIONS = "/v1/images/generations"
MODEL = "gpt-image-2-vip"


def scrape(proxy: Proxy) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by sample name (``…_total``, ``…_bucket``…), each with labels and value."""
    response = httpx.get(proxy.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, Any], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return float(
        sum(
            v
            for found, v in samples.get(name, [])
            if all(found.get(k) == x for k, x in labels.items())
        )
    )


def generate(proxy: Proxy, key: str, **body: Any) -> httpx.Response:
    return httpx.post(
        proxy.url + GENERATIONS,
        json={"prompt": "a lighthouse", "response_format": "url", **body},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def test_metrics_follow_real_traffic(proxy: Proxy, fake: Any) -> None:
    assert proxy.admin("POST", "/admin/teams", json={"name": "design", "daily_usd": 1}).is_success
    key = proxy.new_key(team="design")
    for _ in range(3):
        assert generate(proxy, key).status_code == 200
    assert generate(proxy, key, n=3).status_code == 400
    assert generate(proxy, key, prompt="[fake:500] broken").status_code == 502
    assert generate(proxy, key, prompt="[fake:moderation] no").status_code == 400
    assert generate(proxy, "sk-not-a-key").status_code == 401
    assert billing(fake[1])["images_billed"] == 3  # a 5xx or a refusal bills nothing

    m = scrape(proxy)
    requests = "apiyi_proxy_requests_total"
    assert value(m, requests, route=GENERATIONS, model=MODEL, status_class="2xx") == 3
    assert value(m, requests, route=GENERATIONS, status_class="4xx") == 3
    assert value(m, requests, route=GENERATIONS, model=MODEL, status_class="5xx") == 1
    assert value(m, requests, route="/admin", status_class="2xx") == 2  # team and key
    duration = "apiyi_proxy_request_duration_seconds_count"
    assert value(m, duration, route=GENERATIONS, status_class="2xx") == 3
    upstream = "apiyi_proxy_upstream_duration_seconds_count"
    assert value(m, upstream, model=MODEL, outcome="ok") == 3
    assert value(m, upstream, model=MODEL, outcome="error") == 1  # the 5xx
    assert value(m, upstream, model=MODEL, outcome="refused") == 1  # the moderation 400
    assert value(m, "apiyi_proxy_overhead_seconds_count", route=GENERATIONS) == 5
    # The proxy's own time is a small part of each call, and never negative.
    assert 0 <= value(m, "apiyi_proxy_overhead_seconds_sum", route=GENERATIONS) < 5

    # Money: spend equals billed images × price; the failed call was refunded.
    assert value(m, "apiyi_proxy_images_billed_total", model=MODEL, team="design") == 3
    assert value(m, "apiyi_proxy_images_returned_total", model=MODEL, team="design") == 3
    spend = value(m, "apiyi_proxy_spend_usd_total", model=MODEL, team="design")
    assert abs(spend - 3 * 0.03) < 1e-9
    assert value(m, "apiyi_proxy_uncertain_spend_usd_total") == 0
    assert value(m, "apiyi_proxy_holds_resolved_total", outcome="settled") == 3
    assert value(m, "apiyi_proxy_holds_resolved_total", outcome="released") == 2
    assert value(m, "apiyi_proxy_holds_outstanding") == 0
    remaining = value(m, "apiyi_proxy_budget_remaining_usd", team="design", period="day")
    # Seen when the last hold was taken: three spent and that one held by then.
    assert abs(remaining - (1 - 4 * 0.03)) < 1e-9
    assert value(m, "apiyi_proxy_rejections_total", reason="n_not_supported") == 1
    assert value(m, "apiyi_proxy_rejections_total", reason="invalid_api_key") == 1
    assert value(m, "apiyi_proxy_store_duration_seconds_count", operation="reserve") == 5
    assert value(m, "apiyi_proxy_store_duration_seconds_count", operation="settle") == 5
    assert value(m, "apiyi_proxy_store_errors_total") == 0
    assert value(m, "apiyi_proxy_in_flight_requests", route=GENERATIONS) == 0

    text = httpx.get(proxy.url + "/metrics").text
    families = {
        f.name + ("_total" if f.type == "counter" else "")
        for f in text_string_to_metric_families(text)
        if not f.name.endswith("_created")
    }
    assert families == set(EXPORTED_NAMES)
    for secret in (key, UPSTREAM_KEY, fake[1].url, "sk-not-a-key"):
        assert secret not in text


def test_in_flight_and_holds_while_a_call_runs(proxy: Proxy) -> None:
    key = proxy.new_key()
    done = threading.Event()

    def slow() -> None:
        generate(proxy, key, prompt="[fake:latency=1.5] slow")
        done.set()

    threading.Thread(target=slow, daemon=True).start()
    seen = poll(proxy, lambda m: value(m, "apiyi_proxy_holds_outstanding") == 1)
    assert value(seen, "apiyi_proxy_in_flight_requests", route=GENERATIONS) == 1
    assert done.wait(30)
    after = scrape(proxy)
    assert value(after, "apiyi_proxy_in_flight_requests", route=GENERATIONS) == 0
    assert value(after, "apiyi_proxy_holds_outstanding") == 0


def poll(proxy: Proxy, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while not ready(m := scrape(proxy)):
        assert time.monotonic() < deadline, "the metrics never showed the call"
        time.sleep(0.02)
    return m


def test_no_raw_path_or_unbounded_value_becomes_a_label(proxy: Proxy) -> None:
    key = proxy.new_key()
    for path in ("/v1/images/generations/../x", "/nothing/here-1234", "/admin/keys/abcdef"):
        httpx.get(proxy.url + path, headers={"authorization": f"Bearer {key}"})
    httpx.post(
        proxy.url + GENERATIONS,
        json={"prompt": "x", "model": "model-unbounded-9876"},
        headers={"authorization": f"Bearer {key}", "x-request-id": "req-label-check-42"},
    )
    labels = {
        v for samples in scrape(proxy).values() for found, _ in samples for v in found.values()
    }
    for leaked in ("here-1234", "abcdef", "model-unbounded-9876", "req-label-check-42", key):
        assert not any(leaked in label for label in labels), leaked


def test_budget_gauges_come_from_the_store_before_any_traffic(
    fake: Any, start_proxy: Callable[..., Proxy]
) -> None:
    teams = {"design": {"daily_usd": 2, "monthly_usd": 40}}
    proxy = start_proxy(fake[1].url, ledger={"teams": teams})
    m = poll(proxy, lambda m: value(m, "apiyi_proxy_budget_limit_usd", team="design") > 0)
    assert value(m, "apiyi_proxy_budget_limit_usd", team="design", period="day") == 2
    assert value(m, "apiyi_proxy_budget_limit_usd", team="design", period="month") == 40
    assert value(m, "apiyi_proxy_budget_remaining_usd", team="design", period="day") == 2
    assert value(m, "apiyi_proxy_budget_remaining_usd", team="design", period="month") == 40


METRICS_TOKEN = "metrics-token-for-tests-0123456789abcdef"


def test_metrics_can_require_a_bearer_token(fake: Any, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(fake[1].url, auth={"metrics_token": METRICS_TOKEN})
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": METRICS_TOKEN}):
        refused = httpx.get(proxy.url + "/metrics", headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_metrics_token"
        assert "apiyi_proxy_" not in refused.text
    scraped = httpx.get(
        proxy.url + "/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}
    )
    assert scraped.status_code == 200
    assert "apiyi_proxy_requests_total" in scraped.text
    # The token guards /metrics only; health checks stay open.
    assert httpx.get(proxy.url + "/healthz").status_code == 200


def test_metrics_stay_open_without_a_token(proxy: Proxy) -> None:
    assert httpx.get(proxy.url + "/metrics").status_code == 200
