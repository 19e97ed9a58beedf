"""The openai Node SDK → a proxy process → the fake upstream, over real sockets.

tests/node pins the SDK (package.json, package-lock.json); ``npm ci --prefix tests/node``
installs it. tests/node/sdk_check.mjs runs every check once and prints their facts as JSON;
the tests below judge them. A machine without node or the installed SDK fails, never skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.fake_upstream import FakeUpstream, create_fake_app

from .conftest import ADMIN_TOKEN, ROOT, UPSTREAM_KEY, ProxyProcess, ThreadServer
from .test_sdk import PNG, _tiny_png

NODE_DIR = ROOT / "tests" / "node"
SCRIPT = NODE_DIR / "sdk_check.mjs"
INSTALL = "apt-get install nodejs npm, then npm ci --prefix tests/node (.ci/run does both)"
MODEL = "gpt-image-2-vip"


def node_and_sdk() -> str:
    """The node binary, once the SDK that package-lock.json pins is what is installed."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not installed: {INSTALL}")
    installed = NODE_DIR / "node_modules" / "openai" / "package.json"
    if not installed.is_file():
        pytest.fail(f"the Node SDK is not installed: {INSTALL}")
    pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["openai"]
    version = json.loads(installed.read_text())["version"]
    if version != pinned:
        pytest.fail(f"tests/node has openai {version}, package.json pins {pinned}: {INSTALL}")
    return node


@pytest.fixture(scope="module")
def node_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], Any]]:
    """Run the Node checks once against a proxy process; yield their facts and the billing."""
    node = node_and_sdk()
    image = tmp_path_factory.mktemp("node") / "input.png"
    image.write_bytes(_tiny_png())
    with ThreadServer(create_fake_app(FakeUpstream(api_key=UPSTREAM_KEY))) as upstream:
        proxy = ProxyProcess(
            {
                "APIYI_PROXY_UPSTREAM_URL": upstream.url + "/v1",
                "APIYI_API_KEY": UPSTREAM_KEY,
                "APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN,
            }
        )
        try:
            env = {
                **os.environ,
                "OPENAI_BASE_URL": proxy.url + "/v1",
                "OPENAI_API_KEY": proxy.new_key("node-sdk"),
                "EDIT_IMAGE": str(image),
            }
            done = subprocess.run(
                [node, str(SCRIPT)],
                cwd=NODE_DIR,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            facts: dict[str, Any] = json.loads(done.stdout)
            billed = httpx.get(upstream.url + "/_fake/billing", timeout=10).json()
            yield facts, billed
        finally:
            proxy.stop()
            with contextlib.suppress(OSError):
                Path(proxy.log.name).unlink()


def test_node_generate_gives_b64_that_buffer_decodes_to_a_png(node_run: Any) -> None:
    facts, _ = node_run
    generated = facts["generate"]
    assert "error" not in generated, generated
    assert generated["images"] == 1
    assert generated["created"] > 0
    assert not generated["data_prefix"]
    assert bytes.fromhex(generated["magic"]) == PNG
    assert generated["bytes"] > 64  # a real image, not the magic bytes alone


def test_node_n_2_is_a_bad_request_error_with_its_code(node_run: Any) -> None:
    facts, _ = node_run
    assert facts["n2"] == {
        "error": "BadRequestError",
        "status": 400,
        "type": "invalid_request_error",
        "code": "n_not_supported",
        "param": "n",
        "should_retry": "false",
    }


def test_node_bad_key_is_an_authentication_error(node_run: Any) -> None:
    facts, _ = node_run
    assert facts["bad_key"]["error"] == "AuthenticationError"
    assert facts["bad_key"]["status"] == 401


def test_node_edit_uploads_a_png_and_gets_one_back(node_run: Any) -> None:
    facts, _ = node_run
    edited = facts["edit"]
    assert "error" not in edited, edited
    assert edited["images"] == 1
    assert bytes.fromhex(edited["magic"]) == PNG
    assert edited["bytes"] > 64


def test_node_models_list_names_the_models(node_run: Any) -> None:
    facts, _ = node_run
    assert {MODEL, "gpt-image-2-all", "gpt-image-1"} <= set(facts["models"]["ids"])


def test_node_models_retrieve_a_model_an_alias_and_an_unknown_id(node_run: Any) -> None:
    facts, _ = node_run
    assert facts["retrieve"] == {"id": MODEL, "object": "model"}
    assert facts["retrieve_alias"] == {"id": "dall-e-3", "object": "model", "alias_of": MODEL}
    assert facts["retrieve_unknown"]["error"] == "NotFoundError"
    assert facts["retrieve_unknown"]["status"] == 404
    assert facts["retrieve_unknown"]["code"] == "model_not_found"


def test_node_refusals_never_reach_the_upstream(node_run: Any) -> None:
    _, billed = node_run
    # The generation and the edit only: neither n=2 nor the bad key was forwarded.
    assert billed["images_billed"] == 2
    sizes = sorted(request["size"] for request in billed["requests"])
    assert sizes == ["1280x1280", "2048x1152"]
