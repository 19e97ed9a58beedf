"""The command line: check-config, and keys/teams/usage against a real Redis store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from .conftest import ROOT, Proxy, RedisServer, billing


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "APIYI_PROXY_CONFIG": os.devnull, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_masks_secrets() -> None:
    result = cli(
        "check-config",
        env={
            "APIYI_API_KEY": "upstream-very-secret",
            "APIYI_PROXY_ADMIN_TOKEN": "admin-very-secret-0123456789abcdef",
            "APIYI_PROXY_N_POLICY": "strip",
        },
    )
    assert result.returncode == 0, result.stderr
    assert "upstream-very-secret" not in result.stdout + result.stderr
    assert "admin-very-secret-0123456789abcdef" not in result.stdout + result.stderr
    assert "api_key: '***'" in result.stdout
    assert "n: strip" in result.stdout


def test_check_config_shows_config_teams(tmp_path: Any) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text("ledger:\n  teams:\n    design: {daily_usd: 0.09}\n    ops: {}\n")
    result = cli("check-config", "--fake-upstream", env={"APIYI_PROXY_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert "design:\n      daily_usd: 0.09" in result.stdout


def test_bad_config_exits_with_the_field_named() -> None:
    result = cli("check-config", env={"APIYI_PROXY_SERVER__PORT": "70000"})
    assert result.returncode == 2
    assert "server.port" in result.stderr


def test_keys_need_a_shared_store() -> None:
    result = cli("keys", "list")
    assert result.returncode == 2
    assert "memory://" in result.stderr


def test_keys_teams_and_usage_on_redis(redis_server: RedisServer) -> None:
    env = {
        "APIYI_PROXY_STORE_URL": redis_server.url,
        "APIYI_PROXY_KEY_PEPPER": "pepper-for-tests-0123456789abcdef",
    }
    created = cli(
        "keys",
        "create",
        "--name",
        "bot",
        "--team",
        "design",
        "--daily-usd",
        "5",
        "--rpm",
        "30",
        env=env,
    )
    assert created.returncode == 0, created.stderr
    record: dict[str, Any] = json.loads(created.stdout)
    assert record["key"].startswith("sk-") and len(record["key"]) >= 46
    assert record["daily_usd"] == 5 and record["rpm"] == 30 and record["team"] == "design"

    listed = json.loads(cli("keys", "list", env=env).stdout)
    assert [k["id"] for k in listed] == [record["id"]]
    assert record["key"] not in json.dumps(listed)
    assert listed[0]["display"] == "sk-…" + record["key"][-4:]

    updated = json.loads(cli("keys", "update", record["id"], "--rpm", "60", env=env).stdout)
    assert updated["rpm"] == 60 and updated["daily_usd"] == 5

    team = json.loads(cli("teams", "design", "--daily-usd", "50", env=env).stdout)
    assert team == {
        "name": "design",
        "object": "proxy.team",
        "daily_usd": 50.0,
        "monthly_usd": None,
    }

    revoked = json.loads(cli("keys", "revoke", record["id"], env=env).stdout)
    assert revoked["revoked"] is True
    usage = json.loads(cli("usage", env=env).stdout)
    assert usage["keys"][0]["today"]["spent_usd"] == 0
    assert usage["teams"][0]["team"] == "design"
    assert usage["teams"][0]["today"]["limit_usd"] == 50

    frozen = json.loads(cli("teams", "design", "--daily-usd", "0", env=env).stdout)
    assert frozen["daily_usd"] == 0.0
    lifted = json.loads(cli("teams", "design", "--daily-usd", "none", env=env).stdout)
    assert lifted["daily_usd"] is None and lifted["monthly_usd"] is None


def test_cli_update_to_zero_keeps_a_zero_budget(
    redis_server: RedisServer, fake: Any, start_proxy: Callable[..., Proxy]
) -> None:
    env = {
        "APIYI_PROXY_STORE_URL": redis_server.url,
        "APIYI_PROXY_KEY_PEPPER": "pepper-for-tests-0123456789abcdef",
    }
    created = cli("keys", "create", "--name", "bot", "--daily-usd", "5", env=env)
    assert created.returncode == 0, created.stderr
    record: dict[str, Any] = json.loads(created.stdout)
    key_id = record["id"]

    cut = json.loads(cli("keys", "update", key_id, "--daily-usd", "0", env=env).stdout)
    assert cut["daily_usd"] == 0.0
    # Changing something else keeps the zero; listing shows it as 0, not as no limit.
    other = json.loads(cli("keys", "update", key_id, "--rpm", "60", env=env).stdout)
    assert (other["daily_usd"], other["rpm"]) == (0.0, 60)
    assert json.loads(cli("keys", "list", env=env).stdout)[0]["daily_usd"] == 0.0

    proxy = start_proxy(
        fake[1].url,
        store={"url": redis_server.url},
        auth={"key_pepper": "pepper-for-tests-0123456789abcdef"},
    )
    auth = {"authorization": f"Bearer {record['key']}"}
    url = proxy.url + "/v1/images/generations"
    refused = httpx.post(url, json={"prompt": "x"}, headers=auth, timeout=30)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"

    lifted = json.loads(cli("keys", "update", key_id, "--daily-usd", "none", env=env).stdout)
    assert lifted["daily_usd"] is None and lifted["rpm"] == 60
    assert httpx.post(url, json={"prompt": "x"}, headers=auth, timeout=30).status_code == 200

    usage = json.loads(cli("usage", env=env).stdout)
    assert usage["keys"][0]["today"]["spent_usd"] == pytest.approx(0.03)
    assert billing(fake[1])["images_billed"] == 1


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("keys", "create", "--name", "b", "--daily-usd", "1e-7"), "--daily-usd"),
        (("keys", "create", "--name", "b", "--monthly-usd", "-1"), "--monthly-usd"),
        (("keys", "create", "--name", "b", "--daily-usd", "lots"), "--daily-usd"),
        (("keys", "create", "--name", "b", "--rpm", "1.5"), "--rpm"),
        (("keys", "create", "--name", "b", "--team", "a|b"), "--team"),
        (("teams", "a|b", "--daily-usd", "1"), "name"),
        (("teams", "design", "--daily-usd", "0.0000001"), "--daily-usd"),
        (("keys", "create", "--name", "b", "--rpm", "\u0665"), "--rpm"),  # an Arabic-Indic 5
        (("keys", "create", "--name", "b", "--daily-usd", "1_0"), "--daily-usd"),
    ],
)
def test_cli_refuses_bad_limits_naming_the_flag(args: tuple[str, ...], flag: str) -> None:
    # Refused before any store is opened: the store URL here leads nowhere.
    env = {
        "APIYI_PROXY_STORE_URL": "redis://127.0.0.1:1/0",
        "APIYI_PROXY_KEY_PEPPER": "pepper-for-tests-0123456789abcdef",
    }
    result = cli(*args, env=env)
    assert result.returncode == 2
    assert f"argument {flag}" in result.stderr


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"APIYI_API_KEY": "sk-up", "APIYI_PROXY_ADMIN_TOKEN": "REPLACE_ME_x" * 4}, "admin_token"),
        ({"APIYI_API_KEY": "sk-up", "APIYI_PROXY_ADMIN_TOKEN": "a"}, "auth.admin_token"),
        ({"APIYI_API_KEY": "sk-up", "APIYI_PROXY_KEY_PEPPER": "x"}, "auth.key_pepper"),
        ({}, "upstream.api_key"),
    ],
)
def test_check_config_refuses_what_serve_refuses(env: dict[str, str], field: str) -> None:
    """check-config and serve run one validation: same refusal, same exit status."""
    checked = cli("check-config", env=env)
    served = cli("serve", "--port", "1", env=env)
    for result in (checked, served):
        assert result.returncode == 2, result.stdout + result.stderr
        assert field in result.stderr
    assert checked.stderr == served.stderr


def test_check_config_takes_the_fake_upstream_flag_as_serve_does() -> None:
    result = cli("check-config", "--fake-upstream")
    assert result.returncode == 0, result.stderr
    assert "fake_upstream: true" in result.stdout
