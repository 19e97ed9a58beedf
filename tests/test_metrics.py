"""``/metrics`` after real traffic: every family carries the values the traffic implies."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy import errors
from proxy.metrics import EXPORTED_NAMES, StoreRefused, rejection
from proxy.store import Refusal

from .conftest import ADMIN_TOKEN, UPSTREAM_KEY, Proxy, ProxyProcess, RedisServer, billing

GENERATIONS = "/v1/images/generations"
PEPPER = "pepper-for-tests-0123456789abcdef"
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
    # The proxy's refusals, once each; the upstream's 5xx and moderation are call outcomes.
    assert value(m, "apiyi_proxy_rejections_total", reason="invalid_request") == 1
    assert value(m, "apiyi_proxy_rejections_total", reason="unauthorized") == 1
    assert value(m, "apiyi_proxy_rejections_total") == 2
    calls = "apiyi_proxy_upstream_calls_total"
    assert value(m, calls, model=MODEL, outcome="ok") == 3
    assert value(m, calls, model=MODEL, outcome="error") == 1
    assert value(m, calls, model=MODEL, outcome="refused") == 1
    assert value(m, calls) == 5
    assert value(m, "apiyi_proxy_store_duration_seconds_count", operation="reserve") == 5
    assert value(m, "apiyi_proxy_store_duration_seconds_count", operation="settle") == 5
    assert value(m, "apiyi_proxy_store_errors_total") == 0
    assert value(m, "apiyi_proxy_in_flight_requests", route=GENERATIONS) == 0

    text = httpx.get(proxy.url + "/metrics").text
    families = {
        f.name + ("_total" if f.type == "counter" else "")
        for f in text_string_to_metric_families(text)
    }
    assert families == set(EXPORTED_NAMES)
    assert "_created" not in text
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


# label sets at 0 before their first increase ---------------------------------------------


def test_label_sets_read_by_panels_and_alerts_exist_at_zero_before_any_traffic(
    fake: Any, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(fake[1].url, ledger={"teams": {"design": {"daily_usd": 5}}})
    m = scrape(proxy)
    models = ("gpt-image-2-vip", "gpt-image-2-all")

    def zero(name: str, **labels: str) -> None:
        found = [v for got, v in m.get(name, []) if labels.items() <= got.items()]
        assert found == [0.0], (name, labels, found)

    for model in models:
        for team in ("design", "none"):
            for family in ("spend_usd", "uncertain_spend_usd", "images_billed", "images_returned"):
                zero(f"apiyi_proxy_{family}_total", model=model, team=team)
        for outcome in ("ok", "quota", "auth", "error", "timeout", "refused"):
            zero("apiyi_proxy_upstream_calls_total", model=model, outcome=outcome)
        for route in (GENERATIONS, "/v1/images/edits"):
            for status in ("2xx", "4xx", "5xx", "499"):
                zero("apiyi_proxy_requests_total", route=route, model=model, status_class=status)
    for reason in ("invalid_request", "unauthorized", "rpm", "budget_team_daily"):
        zero("apiyi_proxy_rejections_total", reason=reason)
    for operation in ("reserve", "settle", "key", "teams", "expire", "idempotency"):
        zero("apiyi_proxy_store_errors_total", operation=operation)
    for outcome in ("settled", "released", "uncertain", "expired"):
        zero("apiyi_proxy_holds_resolved_total", outcome=outcome)


def test_teams_of_keys_in_the_store_at_start_get_their_series(
    fake: Any, start_proxy: Callable[..., Proxy], redis_server: RedisServer
) -> None:
    shared = {"store": {"url": redis_server.url}, "auth": {"key_pepper": PEPPER}}
    first = start_proxy(fake[1].url, **shared)
    assert first.admin("POST", "/admin/teams", json={"name": "ops", "daily_usd": 3}).is_success
    first.new_key(team="night-shift")  # a team with no record of its own
    second = start_proxy(fake[1].url, **shared)
    m = poll(
        second,
        lambda m: (
            len([v for got, v in m.get("apiyi_proxy_spend_usd_total", []) if got["team"] != "none"])
            == 4
        ),
    )
    for team in ("ops", "night-shift"):
        assert value(m, "apiyi_proxy_spend_usd_total", model=MODEL, team=team) == 0
        assert ({"model": MODEL, "team": team}, 0.0) in m["apiyi_proxy_spend_usd_total"]


def test_a_team_first_seen_at_hold_time_is_at_zero_before_its_spend(proxy: Proxy) -> None:
    key = proxy.new_key(team="late-team")
    before = scrape(proxy)
    assert not [
        got for got, _ in before["apiyi_proxy_spend_usd_total"] if got["team"] == "late-team"
    ]
    done = threading.Event()

    def slow() -> None:
        assert generate(proxy, key, prompt="[fake:latency=1.5] slow").status_code == 200
        done.set()

    threading.Thread(target=slow, daemon=True).start()
    held = poll(proxy, lambda m: value(m, "apiyi_proxy_holds_outstanding") == 1)
    spend = "apiyi_proxy_spend_usd_total"
    assert ({"model": MODEL, "team": "late-team"}, 0.0) in held[spend]
    assert done.wait(30)
    assert value(scrape(proxy), spend, model=MODEL, team="late-team") == 0.03


# one refusal, one increment --------------------------------------------------------------


def test_each_refusal_is_counted_once_by_its_reason(proxy: Proxy) -> None:
    rejections = "apiyi_proxy_rejections_total"
    cases = [
        (proxy.new_key(rpm=1), "rpm", 429),
        (proxy.new_key(daily_usd=0.03), "budget_key_daily", 429),
        (proxy.new_key(concurrency=0), "zero_limit", 429),
    ]
    for key, reason, status in cases:
        before = scrape(proxy)
        answers = [generate(proxy, key).status_code for _ in range(2)]
        after = scrape(proxy)
        refused = answers.count(status)
        assert refused >= 1, (reason, answers)
        assert (
            value(after, rejections, reason=reason) - value(before, rejections, reason=reason)
            == refused
        )
        assert value(after, rejections) - value(before, rejections) == refused, reason


def test_upstream_failures_are_call_outcomes_not_rejections(proxy: Proxy, caplog: Any) -> None:
    key = proxy.new_key()
    for prompt, status in (("[fake:500] x", 502), ("[fake:quota] x", 502), ("[fake:429] x", 429)):
        assert generate(proxy, key, prompt=prompt).status_code == status
    m = scrape(proxy)
    assert value(m, "apiyi_proxy_rejections_total") == 0
    calls = "apiyi_proxy_upstream_calls_total"
    for outcome in ("error", "quota", "rate_limited"):
        assert value(m, calls, model=MODEL, outcome=outcome) == 1, outcome
    quota = [r for r in caplog.records if "out of quota" in r.getMessage()]
    assert [r.levelname for r in quota] == ["WARNING"]


def test_fanout_counts_every_upstream_call(fake: Any, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(fake[1].url, policy={"n": "fanout"})
    assert generate(proxy, proxy.new_key(), n=3).status_code == 200
    m = scrape(proxy)
    assert value(m, "apiyi_proxy_upstream_calls_total", model=MODEL, outcome="ok") == 3


# money exact ------------------------------------------------------------------------------


def test_spend_adds_up_exactly_in_micro_dollars(
    fake: Any, start_proxy: Callable[..., Proxy]
) -> None:
    assert 0.1 + 0.1 + 0.1 != 0.3  # what adding USD floats would show
    models = [{"name": MODEL, "price_usd": 0.1}, {"name": "gpt-image-2-all", "price_usd": 0.2}]
    proxy = start_proxy(fake[1].url, policy={"models": models})
    key = proxy.new_key()
    for _ in range(3):
        assert generate(proxy, key).status_code == 200
    text = httpx.get(proxy.url + "/metrics").text
    assert f'apiyi_proxy_spend_usd_total{{model="{MODEL}",team="none"}} 0.3\n' in text


# processes --------------------------------------------------------------------------------


def served_config(tmp_path: Path, store: str) -> str:
    path = tmp_path / "proxy.yaml"
    models = [{"name": MODEL, "price_usd": 0.1}, {"name": "gpt-image-2-all", "price_usd": 0.2}]
    path.write_text(yaml.safe_dump({"policy": {"models": models}, "store": {"url": store}}))
    return str(path)


def scrape_url(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_the_fake_upstreams_calls_are_not_the_proxys(
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    served = proxy_process({"APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN}, ["--fake-upstream"])
    answer = httpx.post(
        served.url + "/admin/keys",
        json={"name": "k"},
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    key = answer.json()["key"]
    sent = httpx.post(
        served.url + GENERATIONS,
        json={"prompt": "a lighthouse", "response_format": "url"},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert sent.status_code == 200
    assert httpx.get(served.url + "/_fake_upstream/_fake/billing").json()["images_billed"] == 1
    m = scrape_url(served.url)
    requests = m["apiyi_proxy_requests_total"]
    assert not [labels for labels, _ in requests if labels["route"] == "other"]
    assert value(m, "apiyi_proxy_requests_total", route=GENERATIONS) == 1
    served.stop()  # its access log is flushed
    access = [
        line
        for line in (orjson.loads(x) for x in served.output().splitlines() if x.startswith("{"))
        if line.get("logger") == "apiyi_proxy.access"
    ]
    routes = {line["route"] for line in access}
    assert routes == {"/healthz", "/admin", GENERATIONS, "/metrics"}, routes


def test_two_workers_show_presets_and_exact_spend(
    proxy_process: Callable[..., ProxyProcess], redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {"APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN, "APIYI_PROXY_KEY_PEPPER": PEPPER}
    args = [
        "--fake-upstream",
        "--workers",
        "2",
        "--config",
        served_config(tmp_path, redis_server.url),
    ]
    served = proxy_process(env, args)
    before = scrape_url(served.url)
    assert ({"operation": "reserve"}, 0.0) in before["apiyi_proxy_store_errors_total"]
    assert ({"model": MODEL, "outcome": "quota"}, 0.0) in before["apiyi_proxy_upstream_calls_total"]
    answer = httpx.post(
        served.url + "/admin/keys",
        json={"name": "k"},
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    key = answer.json()["key"]
    with httpx.Client(timeout=30, headers={"authorization": f"Bearer {key}"}) as client:
        for _ in range(3):  # new connections: either worker may answer
            sent = client.post(
                served.url + GENERATIONS,
                json={"prompt": "a lighthouse", "response_format": "url"},
                headers={"connection": "close"},
            )
            assert sent.status_code == 200
    text = httpx.get(served.url + "/metrics").text
    assert f'apiyi_proxy_spend_usd_total{{model="{MODEL}",team="none"}} 0.3\n' in text
    assert "_created" not in text


def test_every_error_is_a_refusal_of_the_proxy_or_an_answer_of_the_upstream() -> None:
    upstream = {errors.UpstreamFailed, errors.UpstreamStatus, errors.UpstreamTimeout}
    for kind in errors.ProxyError.__subclasses__():
        if kind in upstream or kind in (errors.NotFound, errors.MethodNotAllowed):
            continue  # answers of the upstream; routes the image endpoint never answers
        assert rejection(kind("x")) is not None, kind
    assert rejection(errors.UpstreamStatus(403, "x", type_="t", code=None)) is None
    assert rejection(errors.UpstreamFailed("x")) is None
    for refusal, reason in (
        (Refusal.TEAM_MONTHLY, "budget_team_monthly"),
        (Refusal.REVOKED, "unauthorized"),
    ):
        try:
            raise errors.BudgetExceeded("x") from StoreRefused(refusal)
        except errors.BudgetExceeded as error:
            found = rejection(error)
        assert found is not None and found.value == reason
