"""The admin API and a key's own usage, through a real server."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import Proxy, billing

PRICE_USD = 0.03


def generate(proxy: Proxy, key: str) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/images/generations",
        json={"prompt": "x"},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def ledger_spent_usd(proxy: Proxy) -> float:
    keys = proxy.admin("GET", "/admin/usage").json()["keys"]
    return float(sum(k["today"]["spent_usd"] for k in keys))


def test_admin_needs_the_admin_token(proxy: Proxy) -> None:
    key = proxy.new_key()
    for token in (None, key, "wrong"):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        response = httpx.get(proxy.url + "/admin/keys", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


def test_admin_api_is_off_without_a_token(fake: Any, start_proxy: Any) -> None:
    import dataclasses

    proxy = start_proxy(fake[1].url)
    settings = proxy.services.settings
    assert settings.auth.admin_token
    off = dataclasses.replace(settings, auth=dataclasses.replace(settings.auth, admin_token=None))
    from proxy.app import create_app

    from .conftest import ThreadServer

    with ThreadServer(create_app(off)) as server:
        response = httpx.get(server.url + "/admin/keys", headers={"authorization": "Bearer x"})
        assert response.status_code == 404


def test_key_lifecycle(proxy: Proxy) -> None:
    created = proxy.admin(
        "POST",
        "/admin/keys",
        json={
            "name": "bot",
            "team": "design",
            "daily_usd": 0.06,
            "rpm": 10,
            "models": ["gpt-image-2-vip"],
        },
    )
    assert created.status_code == 201
    body = created.json()
    key, key_id = body["key"], body["id"]
    assert body["display"] == "sk-…" + key[-4:]
    listed = proxy.admin("GET", "/admin/keys").json()["data"]
    assert [k["id"] for k in listed] == [key_id] and key not in str(listed)

    auth = {"authorization": f"Bearer {key}"}
    ok = httpx.post(proxy.url + "/v1/images/generations", json={"prompt": "x"}, headers=auth)
    assert ok.status_code == 200
    wrong_model = httpx.post(
        proxy.url + "/v1/images/generations",
        json={"prompt": "x", "model": "gpt-image-2-all"},
        headers=auth,
    )
    assert wrong_model.status_code == 403
    assert wrong_model.json()["error"]["code"] == "model_not_allowed"

    usage = httpx.get(proxy.url + "/v1/usage", headers=auth).json()
    assert usage["today"]["spent_usd"] == 0.03
    assert usage["today"]["remaining_usd"] == 0.03
    assert usage["team"]["name"] == "design"

    patched = proxy.admin("PATCH", f"/admin/keys/{key_id}", json={"daily_usd": 1, "rpm": None})
    assert patched.status_code == 200 and patched.json()["daily_usd"] == 1
    assert patched.json()["rpm"] is None
    moved = proxy.admin("PATCH", f"/admin/keys/{key_id}", json={"team": "other"})
    assert moved.status_code == 400 and moved.json()["error"]["param"] == "team"

    assert proxy.admin("DELETE", f"/admin/keys/{key_id}").json()["revoked"] is True
    refused = httpx.post(proxy.url + "/v1/images/generations", json={"prompt": "x"}, headers=auth)
    assert refused.status_code == 401
    assert proxy.admin("GET", "/admin/keys/key_nope").status_code == 404


def test_bad_admin_input_is_400(proxy: Proxy) -> None:
    for body in (
        {},
        {"name": ""},
        {"name": "x", "daily_usd": -1},
        {"name": "x", "rpm": 1.5},
        {"name": "x", "models": ["dall-e-9"]},
        {"name": "x", "extra": 1},
        {"name": "x", "team": "a{b}"},
    ):
        response = proxy.admin("POST", "/admin/keys", json=body)
        assert response.status_code == 400, body
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert proxy.admin("POST", "/admin/keys", content=b"{nope").status_code == 400


def test_team_budget_applies_across_keys(proxy: Proxy) -> None:
    assert (
        proxy.admin("POST", "/admin/teams", json={"name": "t", "daily_usd": 0.03}).status_code
        == 201
    )
    a, b = proxy.new_key(team="t"), proxy.new_key(team="t")
    url = proxy.url + "/v1/images/generations"
    assert (
        httpx.post(url, json={"prompt": "x"}, headers={"authorization": f"Bearer {a}"}).status_code
        == 200
    )
    refused = httpx.post(url, json={"prompt": "x"}, headers={"authorization": f"Bearer {b}"})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "budget_exceeded"
    usage = proxy.admin("GET", "/admin/usage", params={"team": "t"}).json()
    assert usage["teams"] == [
        {
            "team": "t",
            "today": usage["teams"][0]["today"],
            "this_month": usage["teams"][0]["this_month"],
        }
    ]
    assert usage["teams"][0]["today"]["spent_usd"] == 0.03
    assert len(usage["keys"]) == 2


def test_zero_daily_budget_refuses_every_paid_call(fake: Any, proxy: Proxy) -> None:
    created = proxy.admin("POST", "/admin/keys", json={"name": "frozen", "daily_usd": 0})
    assert created.status_code == 201 and created.json()["daily_usd"] == 0.0
    team = proxy.admin("POST", "/admin/teams", json={"name": "frozen-team", "daily_usd": 0})
    assert team.status_code == 201 and team.json()["daily_usd"] == 0.0
    zero_budgets = [
        created.json()["key"],
        proxy.new_key(monthly_usd=0),
        proxy.new_key(team="frozen-team"),
    ]
    for key in zero_budgets:
        for _ in range(3):
            refused = generate(proxy, key)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["type"] == "insufficient_quota"
            assert refused.json()["error"]["code"] == "budget_exceeded"
    # The same rule for rpm and concurrency: 0 allows no call at all.
    for fields in ({"rpm": 0}, {"concurrency": 0}):
        refused = generate(proxy, proxy.new_key(**fields))
        assert refused.status_code == 429, fields
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.headers["x-should-retry"] == "false"  # waiting cannot help

    # A $5 key cut to 0 stops; null lifts the limit again.
    five = proxy.admin("POST", "/admin/keys", json={"name": "five", "daily_usd": 5}).json()
    assert generate(proxy, five["key"]).status_code == 200
    cut = proxy.admin("PATCH", f"/admin/keys/{five['id']}", json={"daily_usd": 0})
    assert cut.status_code == 200 and cut.json()["daily_usd"] == 0.0
    assert generate(proxy, five["key"]).status_code == 429
    lifted = proxy.admin("PATCH", f"/admin/keys/{five['id']}", json={"daily_usd": None})
    assert lifted.json()["daily_usd"] is None
    assert generate(proxy, five["key"]).status_code == 200

    own = httpx.get(
        proxy.url + "/v1/usage", headers={"authorization": f"Bearer {created.json()['key']}"}
    ).json()["today"]
    assert (own["limit_usd"], own["remaining_usd"], own["spent_usd"]) == (0.0, 0.0, 0)
    # The ledger and the upstream agree: two images, both from the $5 key.
    assert billing(fake[1])["images_billed"] == 2
    assert ledger_spent_usd(proxy) == pytest.approx(2 * PRICE_USD)


def test_budget_below_one_micro_dollar_is_refused_naming_the_field(fake: Any, proxy: Proxy) -> None:
    key = proxy.admin("POST", "/admin/keys", json={"name": "k", "daily_usd": 5}).json()
    assert proxy.admin("POST", "/admin/teams", json={"name": "t"}).status_code == 201
    bad_values = {
        "daily_usd": [1e-7, -1, "5", True, 1e12],
        "monthly_usd": [1e-7, -0.5, [], 1e300],
        "rpm": [1.5, -1, "10"],
        "concurrency": [0.5, -2, False],
    }
    for field, values in bad_values.items():
        for value in values:
            requests = [
                ("POST", "/admin/keys", {"name": "x", field: value}),
                ("PATCH", f"/admin/keys/{key['id']}", {field: value}),
            ]
            if field.endswith("_usd"):
                requests += [
                    ("POST", "/admin/teams", {"name": "t2", field: value}),
                    ("PATCH", "/admin/teams/t", {field: value}),
                ]
            for method, path, body in requests:
                response = proxy.admin(method, path, json=body)
                assert response.status_code == 400, (method, path, body)
                assert response.json()["error"]["param"] == field, (method, path, body)
    # Nothing changed: the key keeps its $5 and spends, the refused team was not made.
    assert proxy.admin("GET", f"/admin/keys/{key['id']}").json()["daily_usd"] == 5
    assert [t["name"] for t in proxy.admin("GET", "/admin/teams").json()["data"]] == ["t"]
    assert generate(proxy, key["key"]).status_code == 200
    assert billing(fake[1])["images_billed"] == 1
    assert ledger_spent_usd(proxy) == pytest.approx(PRICE_USD)


def test_team_name_with_a_bar_is_refused(fake: Any, proxy: Proxy) -> None:
    for name in ("a|b", "a b", "x" * 65, ""):
        key = proxy.admin("POST", "/admin/keys", json={"name": "k", "team": name})
        assert key.status_code == 400 and key.json()["error"]["param"] == "team", name
        team = proxy.admin("POST", "/admin/teams", json={"name": name, "daily_usd": 1})
        assert team.status_code == 400 and team.json()["error"]["param"] == "name", name
    patched = proxy.admin("PATCH", "/admin/teams/a|b", json={"daily_usd": 1})
    assert patched.status_code == 400 and patched.json()["error"]["param"] == "name"
    assert proxy.admin("GET", "/admin/teams").json()["data"] == []
    assert proxy.admin("GET", "/admin/keys").json()["data"] == []
    # A valid name of the whole charset works end to end (the bar used to give 401).
    key = proxy.new_key(team="Team_1.eu-west")
    assert generate(proxy, key).status_code == 200
    assert billing(fake[1])["images_billed"] == 1
    assert ledger_spent_usd(proxy) == pytest.approx(PRICE_USD)
