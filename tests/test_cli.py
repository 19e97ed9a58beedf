"""The command line: check-config, and keys/teams/usage against a real Redis store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from .conftest import ROOT, RedisServer


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
            "APIYI_PROXY_ADMIN_TOKEN": "admin-very-secret",
            "APIYI_PROXY_N_POLICY": "strip",
        },
    )
    assert result.returncode == 0, result.stderr
    assert "upstream-very-secret" not in result.stdout + result.stderr
    assert "admin-very-secret" not in result.stdout + result.stderr
    assert "api_key: '***'" in result.stdout
    assert "n: strip" in result.stdout


def test_bad_config_exits_with_the_field_named() -> None:
    result = cli("check-config", env={"APIYI_PROXY_SERVER__PORT": "70000"})
    assert result.returncode == 2
    assert "server.port" in result.stderr


def test_keys_need_a_shared_store() -> None:
    result = cli("keys", "list")
    assert result.returncode == 2
    assert "memory://" in result.stderr


def test_keys_teams_and_usage_on_redis(redis_server: RedisServer) -> None:
    env = {"APIYI_PROXY_STORE_URL": redis_server.url, "APIYI_PROXY_KEY_PEPPER": "pepper"}
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
