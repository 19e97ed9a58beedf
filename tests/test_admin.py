"""The admin API and a key's own usage, through a real server."""

from __future__ import annotations

from typing import Any

import httpx

from .conftest import Proxy


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
