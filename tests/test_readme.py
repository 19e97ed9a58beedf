"""The README says what the proxy does: its examples run, its lists match the code.

A newcomer copies the README's Python blocks and reads its route and model lists; these
tests run those blocks against a real ``serve --fake-upstream`` and compare the lists with
what the app really serves, so the README cannot drift from the code unnoticed.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from proxy import config
from proxy.app import create_app
from proxy.metrics import EXPORTED_NAMES

from .conftest import ROOT, ProxyProcess

README = (ROOT / "README.md").read_text()
DEPLOY_README = (ROOT / "deploy" / "README.md").read_text()
PNG = b"\x89PNG\r\n\x1a\n"
EXPORT = re.compile(r"export (OPENAI_API_KEY|OPENAI_BASE_URL)=(\S+)")


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def template(path: str) -> str:
    """``/admin/keys/{key_id}`` and ``/admin/keys/{id}`` name the same route."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def documented_routes() -> set[tuple[str, str]]:
    routes: set[tuple[str, str]] = set()
    for row in section(README, "Routes").splitlines():
        if not row.startswith("| `"):
            continue
        first_column = row.split(" | ")[0]
        for cell in re.findall(r"`([^`]+)`", first_column):
            methods, path = cell.rsplit(" ", 1)
            for method in methods.split(", "):
                routes.add((method, template(path)))
    return routes


def served_routes() -> set[tuple[str, str]]:
    # No account poll: the default upstream is not reachable from a test.
    env = {"APIYI_API_KEY": "unused-key", "APIYI_PROXY_UPSTREAM__ACCOUNT_POLL_SECONDS": "0"}
    settings = config.load(path=os.devnull, env=env)
    app = create_app(settings)
    with TestClient(app):  # the lifespan opens and closes what the app holds
        pass
    image_routes = app.app  # type: ignore[attr-defined]  # ExchangeMiddleware -> ImageRoutes
    routes = {("POST", template(path)) for path in image_routes.endpoints}
    for route in image_routes.app.routes:
        if isinstance(route, Mount):
            continue
        assert isinstance(route, Route)
        routes |= {(method, template(route.path)) for method in route.methods or ()}
    routes.discard(("HEAD", "/healthz"))
    return {(m, p) for m, p in routes if m != "HEAD"}


def test_the_routes_table_lists_exactly_the_routes_the_proxy_serves() -> None:
    documented = documented_routes()
    served = served_routes()
    assert documented, "the README has no Routes table"
    assert served - documented == set(), "served but not in the README's Routes table"
    assert documented - served == set(), "in the README's Routes table but not served"


def test_the_readme_names_every_model_and_alias_with_its_target() -> None:
    defaults = config.load(path=os.devnull, env={})
    models = " ".join(section(README, "Routes").split())
    for model in defaults.policy.models:
        assert f"`{model.name}`" in models
    assert (
        f"`{defaults.policy.default_model}` (the default, used when a request names no model)"
        in models
    )
    for alias, target in defaults.policy.model_aliases.items():
        sentence = re.search(rf"`{re.escape(alias)}`[^;]*?become[s]? `([^`]+)`", models)
        assert sentence is not None, f"alias {alias} is not in the README"
        assert sentence.group(1) == target, alias


def test_the_readme_states_the_python_floor_pyproject_sets() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = re.fullmatch(r">=(3\.\d+)", project["requires-python"])
    assert floor is not None, project["requires-python"]
    assert f"Python {floor.group(1)} or newer" in " ".join(README.split())


def test_deploy_readme_says_compose_v2_is_needed_for_a_named_project() -> None:
    compose = (ROOT / "deploy" / "docker-compose.yml").read_text()
    assert re.search(r"^name: ", compose, re.MULTILINE), "the compose file names no project"
    assert "Needs Docker Compose v2" in DEPLOY_README


def test_the_readme_examples_run_against_serve_fake_upstream(
    proxy_process: Callable[..., ProxyProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first-minute generation, then the edit, word for word; then the billing path."""
    served = proxy_process({}, ["--fake-upstream"])
    exports = dict(EXPORT.findall(served.output()))
    assert set(exports) == {"OPENAI_API_KEY", "OPENAI_BASE_URL"}, served.output()
    # The README prints the default port; this process has its own.
    assert exports["OPENAI_BASE_URL"] == served.url + "/v1"
    monkeypatch.setenv("OPENAI_API_KEY", exports["OPENAI_API_KEY"])
    monkeypatch.setenv("OPENAI_BASE_URL", exports["OPENAI_BASE_URL"])
    monkeypatch.chdir(tmp_path)

    blocks = [block for block in python_blocks(README) if "client." in block]
    assert len(blocks) >= 2, "the README lost its generation or edit example"
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    written = sorted(path.name for path in tmp_path.glob("*.png"))
    assert written == ["lighthouse-night.png", "lighthouse.png"]
    for name in written:
        assert (tmp_path / name).read_bytes().startswith(PNG), name

    billing_path = re.search(r"`GET (/_fake_upstream/_fake/billing)`", README)
    assert billing_path is not None, "the README does not give the fake's billing path"
    billed = httpx.get(served.url + billing_path.group(1), timeout=5)
    assert billed.status_code == 200, billed.text
    routes = [request["route"] for request in billed.json()["requests"]]
    assert routes == ["generations", "edits"]
    assert billed.json()["images_billed"] == 2


def test_the_metrics_table_names_every_exported_family() -> None:
    table = section(README, "Metrics")
    named = set(re.findall(r"`(apiyi_proxy_[a-z_]+)`", table))
    assert named == set(EXPORTED_NAMES)


def test_deploy_readme_lists_every_alert_rule() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    table = section(DEPLOY_README, "Alerts (`prometheus/alerts.yml`)")
    listed = set(re.findall(r"^\| `(ApiyiProxy[A-Za-z]+)` \|", table, re.MULTILINE))
    assert listed == alerts
