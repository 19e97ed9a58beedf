"""Spend history: per key, team and model, per day and month, from a real Redis.

Past days are booked straight into the store (as a replica's reserve and settle book
them); today's spend comes from real calls through a proxy process and the fake
upstream. The reports are read over HTTP, from ``/v1/usage`` and with the CLI.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from proxy.config import StoreSettings
from proxy.store import HoldRequest, MemoryStore, Periods, Store, group_of
from proxy.store.base import KeyRecord, Spend
from proxy.store.redis import RedisStore

from .conftest import ADMIN_TOKEN, ROOT, ProxyProcess, RedisServer, process_env

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
VIP, ALL = "gpt-image-2-vip", "gpt-image-2-all"
IMAGE = 30_000  # micro-dollars


async def book(
    store: Store,
    key_id: str,
    team: str | None,
    day: str,
    model: str,
    images: int,
    *,
    uncertain: bool = False,
) -> None:
    """One paid call on ``day``, as a replica's reserve and settle book it."""
    request = HoldRequest(
        hold_id=f"{secrets.token_hex(12)}@{group_of(key_id, team)}",
        key_id=key_id,
        amount=images * IMAGE,
        periods=Periods(day, day[:7]),
        ttl_seconds=60,
        model=model,
        team=team,
    )
    assert (await store.reserve(request)).ok
    spent = images * IMAGE
    await store.settle(request.hold_id, spent, spent if uncertain else 0)


def on_store(kind: str, request: pytest.FixtureRequest) -> Callable[[], Store]:
    if kind == "memory":
        return MemoryStore
    url = request.getfixturevalue("redis_server").url
    return lambda: RedisStore.from_settings(StoreSettings(url=url))


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_history_keeps_spend_per_key_team_and_model_by_day_and_month(
    kind: str, request: pytest.FixtureRequest
) -> None:
    make = on_store(kind, request)

    async def scenario() -> None:
        store = make()
        for record in (
            KeyRecord("k1", "a", "h1", "0001", 0, team="design"),
            KeyRecord("k2", "b", "h2", "0002", 0),
        ):
            await store.add_key(record)
        await book(store, "k1", "design", "2026-10-30", VIP, 1)
        await book(store, "k1", "design", "2026-11-02", ALL, 2, uncertain=True)
        await book(store, "k2", None, "2026-11-02", VIP, 3)

        by_key = {group_of("k1", "design"): ["k1"], group_of("k2", None): ["k2"]}
        days = ["2026-10-30", "2026-10-31", "2026-11-02"]
        assert await store.history("key", by_key, days) == {
            ("k1", "2026-10-30"): Spend(IMAGE, 0, 1),
            ("k1", "2026-11-02"): Spend(2 * IMAGE, 2 * IMAGE, 1),
            ("k2", "2026-11-02"): Spend(3 * IMAGE, 0, 1),
        }
        teams = {group_of("", "design"): ["design"]}
        assert await store.history("team", teams, ["2026-10", "2026-11"]) == {
            ("design", "2026-10"): Spend(IMAGE, 0, 1),
            ("design", "2026-11"): Spend(2 * IMAGE, 2 * IMAGE, 1),
        }
        # A model's spend is the sum over every group it was spent in.
        every_group = {group_of("", "design"): [VIP, ALL], group_of("k2", None): [VIP, ALL]}
        assert await store.history("model", every_group, ["2026-11-02", "2026-11"]) == {
            (VIP, "2026-11-02"): Spend(3 * IMAGE, 0, 1),
            (VIP, "2026-11"): Spend(3 * IMAGE, 0, 1),
            (ALL, "2026-11-02"): Spend(2 * IMAGE, 2 * IMAGE, 1),
            (ALL, "2026-11"): Spend(2 * IMAGE, 2 * IMAGE, 1),
        }
        await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_released_call_counts_as_a_request_and_costs_nothing(
    kind: str, request: pytest.FixtureRequest
) -> None:
    make = on_store(kind, request)

    async def scenario() -> None:
        store = make()
        await store.add_key(KeyRecord("k3", "c", "h3", "0003", 0))
        await book(store, "k3", None, "2026-11-20", VIP, 1)
        released = HoldRequest(
            hold_id=f"{secrets.token_hex(12)}@{group_of('k3', None)}",
            key_id="k3",
            amount=IMAGE,
            periods=Periods("2026-11-20", "2026-11"),
            ttl_seconds=60,
            model=VIP,
        )
        assert (await store.reserve(released)).ok
        assert await store.release(released.hold_id)
        names = {group_of("k3", None): ["k3"]}
        assert await store.history("key", names, ["2026-11-20"]) == {
            ("k3", "2026-11-20"): Spend(IMAGE, 0, 2)
        }
        models = {group_of("k3", None): [VIP]}
        assert await store.history("model", models, ["2026-11"]) == {
            (VIP, "2026-11"): Spend(IMAGE, 0, 2)
        }
        await store.close()

    asyncio.run(scenario())


# through a proxy process ----------------------------------------------------------------


@pytest.fixture
def shop(
    redis_server: RedisServer, fake: Any, proxy_process: Callable[..., ProxyProcess]
) -> dict[str, Any]:
    """A proxy on a real Redis: two keys in team design, one without a team; past
    spend booked in the store, one call of each key made through the proxy today."""
    _, upstream = fake
    env = process_env(upstream.url, APIYI_PROXY_STORE_URL=redis_server.url)
    proxy = proxy_process(env)
    made = {}
    for name, team in (("alice", "design"), ("bob", "design"), ("carol", None)):
        body: dict[str, Any] = {"name": name, **({"team": team} if team else {})}
        answer = httpx.post(proxy.url + "/admin/keys", json=body, headers=ADMIN).json()
        made[name] = answer

    async def past() -> None:
        store = RedisStore.from_settings(StoreSettings(url=redis_server.url))
        await book(store, made["alice"]["id"], "design", "2026-10-15", VIP, 1)
        await book(store, made["bob"]["id"], "design", "2026-11-03", VIP, 2, uncertain=True)
        await book(store, made["carol"]["id"], None, "2026-11-03", ALL, 1)
        await store.close()

    asyncio.run(past())
    for name in made:
        answer = httpx.post(
            proxy.url + "/v1/images/generations",
            json={"prompt": "a lighthouse"},
            headers={"authorization": f"Bearer {made[name]['key']}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
    return {"proxy": proxy, "keys": made, "env": env}


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def admin_usage(proxy: ProxyProcess, **params: str) -> httpx.Response:
    return httpx.get(proxy.url + "/admin/usage", params=params, headers=ADMIN, timeout=30)


def test_admin_usage_history_by_team_month_answers_last_month(shop: dict[str, Any]) -> None:
    proxy, now = shop["proxy"], today()
    answer = admin_usage(
        proxy, **{"from": "2026-10-01", "to": now, "by": "team", "period": "month"}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["from"], body["to"], body["by"], body["period"]) == (
        "2026-10-01",
        now,
        "team",
        "month",
    )
    rows = {row["period"]: row for row in body["rows"]}
    assert rows["2026-10"] == {
        "period": "2026-10",
        "team": "design",
        "spent_usd": 0.03,
        "uncertain_usd": 0.0,
        "requests": 1,
    }
    assert rows["2026-11"]["spent_usd"] == 0.06 and rows["2026-11"]["uncertain_usd"] == 0.06
    # Today's two calls of the team's keys, through the proxy.
    assert (rows[now[:7]]["spent_usd"], rows[now[:7]]["requests"]) == (0.06, 2)


def test_admin_usage_history_by_key_and_model_per_day(shop: dict[str, Any]) -> None:
    proxy, keys, now = shop["proxy"], shop["keys"], today()
    body = admin_usage(proxy, **{"from": "2026-11-01", "to": now, "by": "key"}).json()
    cells = {(row["period"], row["key_id"]): row["spent_usd"] for row in body["rows"]}
    assert cells[("2026-11-03", keys["bob"]["id"])] == 0.06
    assert cells[("2026-11-03", keys["carol"]["id"])] == 0.03
    assert all(cells[(now, keys[name]["id"])] == 0.03 for name in keys)
    assert ("2026-10-15", keys["alice"]["id"]) not in cells  # before the range
    names = {row["key_id"]: row["name"] for row in body["rows"]}
    assert names == {keys[name]["id"]: name for name in keys}
    periods = [row["period"] for row in body["rows"]]
    assert periods == sorted(periods)

    by_model = admin_usage(proxy, **{"from": "2026-11-03", "to": now, "by": "model"}).json()
    models = {(row["period"], row["model"]): row for row in by_model["rows"]}
    assert models[("2026-11-03", VIP)]["spent_usd"] == 0.06
    assert models[("2026-11-03", ALL)]["spent_usd"] == 0.03
    assert models[(now, VIP)]["spent_usd"] == pytest.approx(0.09)

    one_team = admin_usage(proxy, **{"from": "2026-11-01", "by": "key", "team": "design"}).json()
    assert {row["key_id"] for row in one_team["rows"]} == {keys["alice"]["id"], keys["bob"]["id"]}


def test_admin_usage_csv_has_the_fixed_header_and_exact_amounts(shop: dict[str, Any]) -> None:
    proxy = shop["proxy"]
    answer = admin_usage(
        proxy,
        **{"from": "2026-10-01", "to": "2026-11", "by": "team", "period": "month", "format": "csv"},
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/csv")
    lines = answer.text.splitlines()
    assert lines[0] == "period,team,spent_usd,uncertain_usd,requests"
    assert lines[1:] == [
        "2026-10,design,0.03,0,1",
        "2026-11,design,0.06,0.06,1",
    ]


def test_v1_usage_history_shows_the_calling_key_alone(shop: dict[str, Any]) -> None:
    proxy, keys, now = shop["proxy"], shop["keys"], today()
    auth = {"authorization": f"Bearer {keys['bob']['key']}"}
    answer = httpx.get(
        proxy.url + "/v1/usage", params={"from": "2026-11-01", "period": "day"}, headers=auth
    )
    assert answer.status_code == 200, answer.text
    rows = answer.json()["rows"]
    assert {row["key_id"] for row in rows} == {keys["bob"]["id"]}
    assert [(row["period"], row["spent_usd"]) for row in rows] == [
        ("2026-11-03", 0.06),
        (now, 0.03),
    ]
    refused = httpx.get(proxy.url + "/v1/usage", params={"by": "team"}, headers=auth)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "by"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"from": "2026-13-01"}, "from"),
        ({"to": "yesterday"}, "to"),
        ({"from": "2026-11-05", "to": "2026-11-01"}, "from"),
        ({"from": "2024-01-01", "to": "2026-11-30"}, "from"),
        ({"by": "user"}, "by"),
        ({"period": "week"}, "period"),
        ({"format": "xml"}, "format"),
    ],
)
def test_bad_history_query_is_400_naming_the_field(
    shop: dict[str, Any], params: dict[str, str], param: str
) -> None:
    answer = admin_usage(shop["proxy"], **params)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "APIYI_PROXY_CONFIG": os.devnull, **env},
        timeout=60,
    )


@pytest.mark.parametrize("where", ["api", "store"])
def test_cli_usage_history_by_team_as_csv(shop: dict[str, Any], where: str) -> None:
    proxy, env = shop["proxy"], shop["env"]
    flags = ["--url", proxy.url] if where == "api" else []
    if where == "store":
        env = {k: v for k, v in env.items() if k != "APIYI_PROXY_ADMIN_TOKEN"}
    done = run_cli(
        "usage", "--from", "2026-10", "--to", "2026-11", "--by", "team", "--period", "month",
        "--csv", *flags, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = list(csv.reader(io.StringIO(done.stdout)))
    assert rows == [
        ["period", "team", "spent_usd", "uncertain_usd", "requests"],
        ["2026-10", "design", "0.03", "0", "1"],
        ["2026-11", "design", "0.06", "0.06", "1"],
    ]


def test_top_keys_gauge_shows_the_ten_biggest_spenders_and_drops_the_rest() -> None:
    from prometheus_client import CollectorRegistry

    from proxy.config import load
    from proxy.ledger import Ledger
    from proxy.metrics import Metrics

    async def scenario() -> dict[tuple[str, str], float]:
        store = MemoryStore()
        metrics = Metrics(CollectorRegistry())
        ledger = Ledger(store, load(path=os.devnull, env={}), metrics)
        periods = ledger.periods()
        for i in range(12):
            await store.add_key(KeyRecord(f"k{i:02d}", f"name-{i}", f"h{i}", "0000", 0))
            await book(store, f"k{i:02d}", None, periods.day, VIP, i + 1)
        await ledger.refresh_top_keys(periods)
        # k00 spends more the next moment: it is back in the top ten, k02 leaves it.
        await book(store, "k00", None, periods.day, VIP, 5)
        await ledger.refresh_top_keys(periods)
        return {
            (sample.labels["key_id"], sample.labels["period"]): sample.value
            for family in metrics.registry.collect()
            if family.name == "apiyi_proxy_top_key_spend_usd"
            for sample in family.samples
        }

    shown = asyncio.run(scenario())
    day = {key_id: value for (key_id, period), value in shown.items() if period == "day"}
    assert set(day) == {"k00", *(f"k{i:02d}" for i in range(3, 12))}
    assert day["k00"] == pytest.approx(0.18) and day["k11"] == pytest.approx(0.36)
    month = {key_id for (key_id, period) in shown if period == "month"}
    assert month == set(day)


def test_reconciliation_window_counts_each_day_once_in_days_then_months() -> None:
    from proxy.account import window_periods

    assert window_periods("2026-10-30", "2026-12-02") == [
        "2026-10-30",
        "2026-10-31",
        "2026-11",
        "2026-12",
    ]
    assert window_periods("2026-12-01", "2026-12-02") == ["2026-12-01", "2026-12-02"]
    assert window_periods("2025-12-31", "2026-01-01") == ["2025-12-31", "2026-01"]


def test_a_team_narrows_a_history_by_model_to_that_teams_spend(shop: dict[str, Any]) -> None:
    proxy, now = shop["proxy"], today()
    design = admin_usage(
        proxy, **{"from": "2026-11-03", "to": now, "by": "model", "team": "design"}
    )
    models = {(row["period"], row["model"]): row["spent_usd"] for row in design.json()["rows"]}
    # carol's spend (no team) is not design's: neither her 2026-11-03 call nor today's.
    assert models == {("2026-11-03", VIP): 0.06, (now, VIP): pytest.approx(0.06)}
