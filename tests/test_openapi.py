"""The OpenAPI document and the docs page: valid, complete, self-contained; and the
admin bodies the models refuse are answered as every other 400."""

from __future__ import annotations

import os
import re
from typing import Any

import jsonschema_rs  # schemathesis' own JSON Schema validator
import pytest
import schemathesis
from schemathesis.specs.openapi.definitions import OPENAPI_31
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from proxy import config
from proxy.app import create_app
from proxy.openapi import DOCS_CSP, document
from proxy.schemas import KeyCreate, field_path
from tests.conftest import ADMIN_TOKEN, Proxy

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
# Served, but not part of the proxy's own API.
UNDESCRIBED = re.compile(r"^/console|^/_fake")


def settings() -> config.Settings:
    env = {"APIYI_API_KEY": "unused-key", "APIYI_PROXY_UPSTREAM__ACCOUNT_POLL_SECONDS": "0"}
    return config.load(path=os.devnull, env=env)


def served(app: Any) -> set[tuple[str, str]]:
    image_routes = app.app  # ExchangeMiddleware -> ImageRoutes
    routes = {("POST", path) for path in image_routes.endpoints}
    for route in image_routes.app.routes:
        if isinstance(route, Mount):
            continue
        assert isinstance(route, Route)
        path = route.path.replace(":path}", "}")
        routes |= {(method, path) for method in route.methods or () if method != "HEAD"}
    return {(m, p) for m, p in routes if not UNDESCRIBED.match(p)}


def test_the_document_is_valid_openapi_3_1_and_schemathesis_loads_it() -> None:
    spec = document(settings())
    assert spec["openapi"] == "3.1.0"
    jsonschema_rs.Draft202012Validator(OPENAPI_31).validate(spec)
    for schema in spec["components"]["schemas"].values():
        jsonschema_rs.meta.validate(schema)
    loaded = schemathesis.openapi.from_dict(spec)
    operations = [result.ok() for result in loaded.get_all_operations()]
    assert len(operations) == sum(len(methods) for methods in spec["paths"].values())


def test_every_route_the_app_serves_is_in_the_document() -> None:
    app = create_app(settings())
    with TestClient(app) as client:
        spec = client.get("/openapi.json").json()
    described = {(m.upper(), p) for p, methods in spec["paths"].items() for m in methods}
    assert served(app) == described


def test_every_operation_says_what_its_errors_look_like() -> None:
    spec = document(settings())
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            if path.startswith("/admin"):
                assert op["security"] == [{"adminToken": []}], (method, path)
                assert {"401", "404", "503"} <= set(op["responses"]), (method, path)
            if path.startswith(("/v1/usage", "/v1/images")):
                assert op["security"] == [{"clientKey": []}], (method, path)
            for status, answer in op["responses"].items():
                assert answer["headers"]["x-request-id"]["required"] is True
                if status[0] in "45":
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path)


def test_the_document_follows_the_config() -> None:
    s = settings()
    policy = s.policy.__class__(**{**s.policy.__dict__, "max_prompt_chars": 100, "max_n": 4})
    spec = document(s.__class__(**{**s.__dict__, "policy": policy}))
    generation = spec["components"]["schemas"]["ImageGeneration"]["properties"]
    assert generation["prompt"]["maxLength"] == 100
    assert generation["n"]["anyOf"][0]["maximum"] == 4


def test_the_docs_page_loads_nothing_from_outside() -> None:
    app = create_app(settings())
    with TestClient(app) as client:
        page = client.get("/docs")
        css = client.get("/docs/docs.css")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == DOCS_CSP
    assert "default-src 'none'" in DOCS_CSP and "script-src" not in DOCS_CSP
    assert page.headers["x-request-id"]
    html = page.text
    assert "<script" not in html.lower() and " style=" not in html and "<style" not in html
    links = re.findall(r"""(?:src|href|action)\s*=\s*["']?([^"'\s>]+)""", html, re.I)
    assert links and all(not re.match(r"^[a-z][a-z0-9+.-]*:|^//", link, re.I) for link in links)
    assert not re.search(r"(?<![\w.])(?:https?:)?//[a-z0-9]", html.replace("\\/", "/"), re.I)
    for op in ("createKey", "createImage", "usage", "ownUsage", "listModels"):
        assert f'id="{op}"' in html
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "url(" not in css.text and "@import" not in css.text


def test_the_docs_routes_are_counted_under_their_own_names() -> None:
    app = create_app(settings())
    with TestClient(app) as client:
        for path in ("/openapi.json", "/docs", "/docs/docs.css"):
            assert client.get(path).status_code == 200
        exposition = client.get("/metrics").text
    assert 'route="/openapi.json"' in exposition and 'route="/docs"' in exposition
    assert 'route="other"' not in exposition


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "name"),
        ({"name": " "}, "name"),
        ({"name": "x", "daily_usd": "5"}, "daily_usd"),
        ({"name": "x", "rpm": True}, "rpm"),
        ({"name": "x", "concurrency": 1.5}, "concurrency"),
        ({"name": "x", "models": "gpt-image-2-vip"}, "models"),
        ({"name": "x", "models": ["gpt-image-2-vip", 5]}, "models[1]"),
        ({"name": "x", "models": ["dall-e-9"]}, "models"),
        ({"name": "x", "surprise": 1}, "surprise"),
        ({"name": "x", "team": "a|b"}, "team"),
    ],
)
def test_admin_bodies_the_models_refuse_are_the_usual_400(
    proxy: Proxy, body: dict[str, Any], param: str
) -> None:
    response = proxy.admin("POST", "/admin/keys", json=body)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert error["param"] == param
    assert param.split("[")[0] in error["message"]


def test_a_key_change_keeps_absent_fields_and_refuses_nulls_that_mean_nothing(
    proxy: Proxy,
) -> None:
    created = proxy.admin("POST", "/admin/keys", json={"name": "k", "rpm": 5}).json()
    url = f"/admin/keys/{created['id']}"
    for body, param in (({"name": None}, "name"), ({"revoked": None}, "revoked")):
        refused = proxy.admin("PATCH", url, json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param
    renamed = proxy.admin("PATCH", url, json={"name": "  k2 ", "rpm": 2.0}).json()
    assert (renamed["name"], renamed["rpm"], renamed["models"]) == ("k2", 2, [])


def test_a_team_patch_cannot_rename_the_team(proxy: Proxy) -> None:
    assert proxy.admin("PATCH", "/admin/teams/t", json={"daily_usd": 1}).status_code == 201
    same = proxy.admin("PATCH", "/admin/teams/t", json={"name": "t", "monthly_usd": 2})
    assert same.status_code == 200 and same.json()["daily_usd"] == 1
    other = proxy.admin("PATCH", "/admin/teams/t", json={"name": "u"})
    assert other.status_code == 400 and other.json()["error"]["param"] == "name"


def test_a_field_path_reads_as_in_openai_errors() -> None:
    assert field_path(("models", 1)) == "models[1]"
    assert field_path(("a", "b", 0, "c")) == "a.b[0].c"
    assert field_path(()) == ""
    assert KeyCreate.model_json_schema()["additionalProperties"] is False
