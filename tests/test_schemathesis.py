"""schemathesis against a real proxy process (Redis store, the fake upstream, no
latency): every operation of ``/openapi.json``, no 5xx of the proxy's own and no
answer the document does not describe. Deterministic: derandomized, a bounded number
of examples an operation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from proxy import config
from proxy.fake_upstream import FakeUpstream, create_fake_app
from proxy.openapi import document
from tests.conftest import (
    ADMIN_TOKEN,
    UPSTREAM_KEY,
    ProxyProcess,
    RedisServer,
    ThreadServer,
    process_env,
)

EXAMPLES = 40  # per operation: the whole file stays well under a minute
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
NO_LIMITS = {"daily_usd": None, "monthly_usd": None, "rpm": None, "concurrency": None}


class Served:
    def __init__(self, proxy: ProxyProcess, client_key: str, target_id: str) -> None:
        self.proxy = proxy
        self.client_key = client_key
        self.target_id = target_id

    def headers(self, path: str) -> dict[str, str]:
        """The credentials each operation's security names."""
        if path.startswith("/admin"):
            return {"authorization": f"Bearer {ADMIN_TOKEN}"}
        if path.startswith(("/v1/", "/images/", "/usage")):
            return {"authorization": f"Bearer {self.client_key}"}
        return {}


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    redis = RedisServer()
    upstream = ThreadServer(create_fake_app(FakeUpstream(api_key=UPSTREAM_KEY, latency=0.0)))
    proxy: ProxyProcess | None = None
    try:
        with upstream:
            env = process_env(
                upstream.url,
                APIYI_PROXY_STORE_URL=redis.url,
                APIYI_PROXY_UPSTREAM__ACCOUNT_POLL_SECONDS="0",
            )
            proxy = ProxyProcess(env)
            client_key = proxy.new_key("schemathesis", **NO_LIMITS)
            target = httpx.post(
                proxy.url + "/admin/keys",
                json={"name": "target", "team": "t"},
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            yield Served(proxy, client_key, target.json()["id"])
    finally:
        if proxy is not None:
            proxy.stop()
        redis.stop()


@pytest.fixture(scope="module")
def api(served: Served) -> Any:
    loaded = schemathesis.openapi.from_url(served.proxy.url + "/openapi.json")
    loaded.config.update(base_url=served.proxy.url)
    return loaded


def operations() -> list[tuple[str, str]]:
    env = {"APIYI_API_KEY": "unused-key"}
    spec = document(config.load(path=os.devnull, env=env))
    return [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]


@pytest.mark.cases(EXAMPLES)
@pytest.mark.parametrize(("method", "path"), operations())
def test_the_proxy_answers_as_its_document_says(
    api: Any, served: Served, method: str, path: str
) -> None:
    operation = api[path][method]

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy())
    def answers_as_documented(case: Any) -> None:
        if "key_id" in case.path_parameters and len(case.path_parameters["key_id"]) % 2:
            # Half the calls reach a key that exists (never the one the test calls with).
            case.path_parameters["key_id"] = served.target_id
        case.call_and_validate(headers=served.headers(path), checks=CHECKS, timeout=30)

    answers_as_documented()


def test_the_document_it_serves_is_the_one_checked(served: Served) -> None:
    spec = httpx.get(served.proxy.url + "/openapi.json").json()
    assert spec["openapi"] == "3.1.0" and "/admin/keys" in spec["paths"]
