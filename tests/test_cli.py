"""The command line: --version, help, check-config, and keys/teams/usage against a real
Redis store and through a running proxy's admin API (memory and Redis stores)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any

import httpx
import pytest

from proxy import cli as cli_module

from .conftest import (
    ADMIN_TOKEN,
    ROOT,
    Proxy,
    ProxyProcess,
    RedisServer,
    billing,
    free_port,
    generate_at,
)

PEPPER = "pepper-for-tests-0123456789abcdef"
Run = Callable[..., subprocess.CompletedProcess[str]]


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


def test_version_is_the_package_version() -> None:
    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"apiyi-proxy {metadata.version('apiyi-proxy')}\n"


def command_paths(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every command and action of the parser, as the words that name it."""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_paths(sub, (*path, name))


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    paths = list(command_paths(cli_module._parser()))
    assert ("keys", "update") in paths and ("teams",) in paths  # the walk reaches the leaves
    for path in paths:
        with pytest.raises(SystemExit) as ended:
            cli_module.main([*path, "--help"])
        assert ended.value.code == 0
        shown = capsys.readouterr().out
        assert shown.startswith("usage: apiyi-proxy"), path
        # No reST (or Markdown) markup: ``literal``, `role`, :role:`x`.
        assert "`" not in shown, (path, shown)


@pytest.mark.parametrize("command", [("keys", "list"), ("usage",), ("teams", "design")])
def test_memory_store_commands_say_how_to_reach_the_proxy(command: tuple[str, ...]) -> None:
    result = cli(*command)
    assert result.returncode == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "memory://" in message
    assert "--url http://127.0.0.1:8080" in message
    assert "APIYI_PROXY_URL" in message and "APIYI_PROXY_ADMIN_TOKEN" in message
    assert "Traceback" not in result.stderr


def exercise_store_commands(run: Run) -> None:
    """keys create/list/update/revoke, teams and usage: one script, whatever reaches the store
    (which may hold keys already: serve's first key on a memory store)."""
    before = [k["id"] for k in json.loads(run("keys", "list").stdout)]
    created = run(
        "keys", "create", "--name", "bot", "--team", "design", "--daily-usd", "5", "--rpm", "30"
    )
    assert created.returncode == 0, created.stderr
    record: dict[str, Any] = json.loads(created.stdout)
    assert record["key"].startswith("sk-") and len(record["key"]) >= 46
    assert record["daily_usd"] == 5 and record["rpm"] == 30 and record["team"] == "design"
    assert "shown this once" in created.stderr

    listed = json.loads(run("keys", "list").stdout)
    # Listed by creation time to the second, then by id: compare as sets.
    assert sorted(k["id"] for k in listed) == sorted([*before, record["id"]])
    assert record["key"] not in json.dumps(listed)
    (shown,) = (k for k in listed if k["id"] == record["id"])
    assert shown["display"] == "sk-…" + record["key"][-4:]

    updated = json.loads(run("keys", "update", record["id"], "--rpm", "60").stdout)
    assert updated["rpm"] == 60 and updated["daily_usd"] == 5
    renamed = json.loads(run("keys", "update", record["id"], "--name", "robot").stdout)
    assert renamed["name"] == "robot" and renamed["rpm"] == 60

    team = json.loads(run("teams", "design", "--daily-usd", "50").stdout)
    assert team == {
        "name": "design",
        "object": "proxy.team",
        "daily_usd": 50.0,
        "monthly_usd": None,
    }

    revoked = json.loads(run("keys", "revoke", record["id"]).stdout)
    assert revoked["revoked"] is True and revoked["id"] == record["id"]
    assert revoked["name"] == "robot"
    usage = json.loads(run("usage").stdout)
    assert sorted(k["id"] for k in usage["keys"]) == sorted([*before, record["id"]])
    (used,) = (k for k in usage["keys"] if k["id"] == record["id"])
    assert used["today"]["spent_usd"] == 0
    assert usage["teams"][0]["team"] == "design"
    assert usage["teams"][0]["today"]["limit_usd"] == 50
    only = json.loads(run("usage", "--team", "nobody").stdout)
    assert only["keys"] == [] and only["teams"] == []

    frozen = json.loads(run("teams", "design", "--daily-usd", "0").stdout)
    assert frozen["daily_usd"] == 0.0
    lifted = json.loads(run("teams", "design", "--daily-usd", "none").stdout)
    assert lifted["daily_usd"] is None and lifted["monthly_usd"] is None


def redis_env(redis: RedisServer) -> dict[str, str]:
    return {"APIYI_PROXY_STORE_URL": redis.url, "APIYI_PROXY_KEY_PEPPER": PEPPER}


def test_keys_teams_and_usage_on_redis(redis_server: RedisServer) -> None:
    env = redis_env(redis_server)
    exercise_store_commands(lambda *args: cli(*args, env=env))


def through(url: str, *, token: str = ADMIN_TOKEN) -> Run:
    """The CLI pointed at a proxy with --url; the token only in the environment."""
    env = {"APIYI_PROXY_ADMIN_TOKEN": token}
    return lambda *args: cli(*args, "--url", url, env=env)


@pytest.fixture(params=["memory", "redis"])
def served(
    request: pytest.FixtureRequest, proxy_process: Callable[..., ProxyProcess]
) -> ProxyProcess:
    """A real apiyi-proxy serve with the admin API on, over each store."""
    env = {"APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN, "APIYI_PROXY_LOG__LEVEL": "warning"}
    if request.param == "redis":
        env |= redis_env(request.getfixturevalue("redis_server"))
    return proxy_process(env, ["--fake-upstream"])


def test_keys_teams_and_usage_through_the_admin_api(served: ProxyProcess) -> None:
    exercise_store_commands(through(served.url))


def test_proxy_url_from_the_environment(served: ProxyProcess) -> None:
    env = {"APIYI_PROXY_URL": served.url + "/v1", "APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN}
    created = cli("keys", "create", "--name", "env", env=env)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    answer = generate_at(served.url, key)
    assert answer.status_code == 200, answer.text


def test_admin_api_and_redis_store_print_the_same(
    redis_server: RedisServer, proxy_process: Callable[..., ProxyProcess]
) -> None:
    env = redis_env(redis_server)
    proxy = proxy_process(
        {**env, "APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN, "APIYI_PROXY_LOG__LEVEL": "warning"},
        ["--fake-upstream"],
    )
    remote = through(proxy.url)

    def direct(*args: str) -> subprocess.CompletedProcess[str]:
        return cli(*args, env=env)

    key_id = json.loads(remote("keys", "create", "--name", "a", "--team", "ops").stdout)["id"]
    json.loads(direct("keys", "create", "--name", "b", "--monthly-usd", "9").stdout)
    # A team with budgets of its own and no key yet.
    assert direct("teams", "design", "--daily-usd", "3").returncode == 0
    steps = [
        ("keys", "list"),
        ("usage",),
        ("usage", "--team", "ops"),
        ("keys", "update", key_id, "--rpm", "7", "--daily-usd", "none"),
        ("teams", "ops", "--monthly-usd", "100"),
        ("keys", "revoke", key_id),
        ("keys", "list"),
        ("usage",),
    ]
    for step in steps:
        by_store, by_api = direct(*step), remote(*step)
        assert by_store.returncode == by_api.returncode == 0, (step, by_store.stderr, by_api.stderr)
        assert by_store.stdout == by_api.stdout, step


def test_admin_api_errors_are_one_line(proxy_process: Callable[..., ProxyProcess]) -> None:
    on = proxy_process({"APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN}, ["--fake-upstream"])
    off = proxy_process({}, ["--fake-upstream"])
    wrong = "wrong-token-for-tests-0123456789abcdef"
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cases: list[tuple[Run, tuple[str, ...], int, str]] = [
        (through(on.url, token=wrong), ("keys", "list"), 1, "answered 401"),
        (
            through(on.url),
            ("keys", "revoke", "key_0000000000000000"),
            1,
            "answered 404: No such key",
        ),
        (
            through(on.url),
            ("keys", "create", "--name", "x", "--model", "dall-e-9"),
            2,
            "answered 400",
        ),
        (through(off.url), ("usage",), 1, "admin API is off"),
        (through(nowhere), ("keys", "list"), 1, "connection refused"),
    ]
    for run, args, status, said in cases:
        result = run(*args)
        assert result.returncode == status, (args, result.stderr)
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("apiyi-proxy: "), result.stderr
        assert said in lines[0], lines[0]
        assert ADMIN_TOKEN not in result.stderr and wrong not in result.stderr


def test_url_without_an_admin_token_names_the_variable() -> None:
    result = cli("keys", "list", "--url", "http://127.0.0.1:1")
    assert result.returncode == 2
    assert "APIYI_PROXY_ADMIN_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


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
