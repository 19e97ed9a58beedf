"""Settings sources and types: defaults < YAML < environment < command line, values
checked strictly per type, and every error naming the field by its dotted path."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from proxy import config


def load(
    text: str = "",
    tmp_path: Path | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> config.Settings:
    path: Path | str = "/dev/null"
    if tmp_path is not None:
        path = tmp_path / "proxy.yaml"
        path.write_text(text)
    return config.load(path=path, env=env or {}, overrides=overrides)


def refusal(text: str = "", tmp_path: Path | None = None, env: dict[str, str] | None = None) -> str:
    with pytest.raises(config.ConfigError) as info:
        load(text, tmp_path, env)
    return str(info.value)


# precedence -------------------------------------------------------------------------------


def test_a_nested_field_is_taken_from_defaults_then_yaml_then_environment(
    tmp_path: Path,
) -> None:
    text = "store:\n  timeout_seconds: 1.5\nalerts:\n  thresholds: [10, 20]\n"
    assert load().store.timeout_seconds == 0.5
    from_yaml = load(text, tmp_path)
    assert from_yaml.store.timeout_seconds == 1.5
    assert from_yaml.alerts.thresholds == (10.0, 20.0)
    from_env = load(
        text,
        tmp_path,
        {"APIYI_PROXY_STORE__TIMEOUT_SECONDS": "2.5", "APIYI_PROXY_ALERTS__THRESHOLDS": "[30]"},
    )
    assert from_env.store.timeout_seconds == 2.5
    assert from_env.alerts.thresholds == (30.0,)
    # The environment replaces one field; the section's other fields keep the file's value.
    mixed = load("store:\n  timeout_seconds: 1.5\n  key_prefix: filed\n", tmp_path)
    assert (mixed.store.timeout_seconds, mixed.store.key_prefix) == (1.5, "filed")


def test_a_fixed_name_overrides_the_yaml_path_it_stands_for(tmp_path: Path) -> None:
    text = "policy:\n  n: strip\nupstream:\n  base_url: http://filed:1/v1\n"
    s = load(text, tmp_path, {"APIYI_PROXY_N_POLICY": "fanout"})
    assert s.policy.n == "fanout"
    assert s.upstream.base_url == "http://filed:1/v1"
    s = load(text, tmp_path, {"APIYI_PROXY_UPSTREAM_URL": "http://env:2/v1"})
    assert s.upstream.base_url == "http://env:2/v1"


def test_command_line_flags_win_over_the_environment_unless_unset() -> None:
    env = {"APIYI_PROXY_SERVER__PORT": "7001", "APIYI_PROXY_SERVER__HOST": "0.0.0.0"}
    s = load(env=env, overrides={"server": {"port": 7002, "host": None}})
    assert (s.server.port, s.server.host) == (7002, "0.0.0.0")


def test_worker_environment_loads_the_same_server_settings() -> None:
    s = load(overrides={"server": {"host": "0.0.0.0", "port": 7003, "fake_upstream": True}})
    again = load(env=config.worker_environment(s))
    assert again.server == s.server


# environment values -----------------------------------------------------------------------


def test_environment_values_read_as_yaml_where_the_field_is_not_text() -> None:
    env = {
        "APIYI_PROXY_SERVER__FAKE_UPSTREAM": "true",
        "APIYI_PROXY_SERVER__METRICS_PORT": "9100",
        "APIYI_PROXY_UPSTREAM__READ_TIMEOUT": "12",
        "APIYI_PROXY_STORE__REQUEST_LOG_MAX": "null",
        "APIYI_PROXY_POLICY__MODEL_ALIASES": "{dall-e-2: gpt-image-2-all}",
    }
    s = load(env=env)
    assert s.server.fake_upstream is True
    assert s.server.metrics_port == 9100
    assert s.upstream.read_timeout == 12.0 and isinstance(s.upstream.read_timeout, float)
    assert s.store.request_log_max is None
    assert dict(s.policy.model_aliases) == {"dall-e-2": "gpt-image-2-all"}


def test_text_fields_and_secrets_take_the_variable_as_written() -> None:
    env = {
        "APIYI_PROXY_STORE__KEY_PREFIX": "2024",
        "APIYI_PROXY_SERVER__HOST": "0.0.0.0",
        "APIYI_API_KEY": "0x1F",
        "APIYI_PROXY_KEY_PEPPER": "1" * 40,
    }
    s = load(env=env)
    assert s.store.key_prefix == "2024"
    assert s.server.host == "0.0.0.0"
    assert s.upstream.api_key == "0x1F"  # not the number 31
    assert s.auth.key_pepper == "1" * 40


# errors name the field --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"APIYI_PROXY_SERVER__PORT": "many"}, "server.port: must be an integer, got 'many'"),
        ({"APIYI_PROXY_SERVER__PORT": "80.5"}, "server.port: must be an integer, got 80.5"),
        ({"APIYI_PROXY_SERVER__NOPE": "1"}, "server.nope: unknown setting"),
        ({"APIYI_PROXY_AUTH_MODE": "open"}, "auth.mode: must be 'keys' or 'passthrough'"),
        (
            {"APIYI_PROXY_ALERTS__WEBHOOKS": "[{url: 'http://h/x', format: xml}]"},
            "alerts.webhooks[0].format: must be 'json' or 'slack', got 'xml'",
        ),
        ({"APIYI_PROXY_ALERTS__WEBHOOKS": "{url: x}"}, "alerts.webhooks: must be a list"),
        (
            {"APIYI_PROXY_LEDGER__TEAMS": "{ops: {daily_usd: lots}}"},
            "ledger.teams.ops.daily_usd: must be a number, got 'lots'",
        ),
    ],
)
def test_a_bad_environment_value_names_the_nested_field(env: dict[str, str], message: str) -> None:
    assert refusal(env=env).startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server:\n  port: many\n", "server.port: must be an integer, got 'many'"),
        ("server: 3\n", "server: must be a mapping"),
        ("nope: {}\n", "nope: unknown setting"),
        ("store:\n  bogus: 1\n", "store.bogus: unknown setting"),
        (
            "policy:\n  models: [{name: a}, {name: b, price_usd: x}]\n",
            "policy.models[1].price_usd: must be a number, got 'x'",
        ),
        (
            "policy:\n  models: [{name: a, bogus: 1}]\n  default_model: a\n",
            "policy.models[0].bogus: unknown setting",
        ),
        ("policy:\n  models: [{price_usd: 1}]\n", "policy.models[0].name: must be set"),
        ("policy:\n  models: x\n", "policy.models: must be a list"),
        ("ledger:\n  teams: {a: [1]}\n", "ledger.teams.a: must be a mapping"),
        ("log:\n  level: loud\n", "log.level: must be 'debug', 'info', 'warning' or 'error'"),
        ("a: &loop [*loop]\n", "config: "),
    ],
)
def test_a_bad_yaml_value_names_the_nested_field(tmp_path: Path, text: str, message: str) -> None:
    assert refusal(text, tmp_path).startswith(message)


# strictness -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server:\n  port: true\n", "server.port: must be an integer, got True"),
        ("server:\n  port: 8080.0\n", "server.port: must be an integer, got 8080.0"),
        ("server:\n  port: '8080'\n", "server.port: must be an integer, got '8080'"),
        ("server:\n  port: '8080.5'\n", "server.port: must be an integer, got '8080.5'"),
        ("ledger:\n  default_rpm: 1.5\n", "ledger.default_rpm: must be an integer, got 1.5"),
        ("upstream:\n  read_timeout: yes\n", "upstream.read_timeout: must be a number, got True"),
        ("upstream:\n  read_timeout: '5'\n", "upstream.read_timeout: must be a number, got '5'"),
        ("server:\n  fake_upstream: 1\n", "server.fake_upstream: must be true or false, got 1"),
        (
            "server:\n  fake_upstream: 'true'\n",
            "server.fake_upstream: must be true or false, got 'true'",
        ),
        ("store:\n  key_prefix: 2024\n", "store.key_prefix: must be a string, got 2024"),
        ("policy:\n  model_aliases: {a: 1}\n", "policy.model_aliases.a: must be a string, got 1"),
        ("alerts:\n  thresholds: [50, true]\n", "alerts.thresholds[1]: must be a number, got True"),
    ],
)
def test_each_type_takes_only_its_own_values(tmp_path: Path, text: str, message: str) -> None:
    assert refusal(text, tmp_path) == message


@pytest.mark.parametrize(
    "env",
    [
        {"APIYI_PROXY_SERVER__PORT": "true"},
        {"APIYI_PROXY_SERVER__PORT": "8080.0"},
        {"APIYI_PROXY_SERVER__FAKE_UPSTREAM": "1"},
        {"APIYI_PROXY_UPSTREAM__READ_TIMEOUT": "false"},
    ],
)
def test_the_environment_is_as_strict_as_the_file(env: dict[str, str]) -> None:
    (name,) = env
    field = name.removeprefix("APIYI_PROXY_").lower().replace("__", ".")
    assert refusal(env=env).startswith(f"{field}: must be ")


def test_loaded_settings_are_the_frozen_dataclasses_with_their_own_types(tmp_path: Path) -> None:
    text = (
        "upstream:\n  read_timeout: 5\n"
        "policy:\n  models: [{name: m, sizes: [1x1]}]\n  default_model: m\n"
        "  model_aliases: {}\n"
    )
    s = load(text, tmp_path)
    assert isinstance(s.upstream, config.UpstreamSettings)
    assert type(s.upstream.read_timeout) is float
    assert s.policy.models == (config.ModelSettings("m", sizes=("1x1",)),)
    assert hash(s.policy.models)  # tuples all the way down
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.server.port = 1  # type: ignore[misc]
    assert dataclasses.replace(s, server=config.ServerSettings(port=1)).server.port == 1
