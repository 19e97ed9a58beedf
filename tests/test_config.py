"""Settings: defaults, YAML, environment, validation errors naming the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from proxy import config
from proxy.limits import Limits

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "proxy.example.yaml"


def load(text: str = "", tmp_path: Path | None = None, **env: str) -> config.Settings:
    path = None
    if tmp_path is not None:
        path = tmp_path / "proxy.yaml"
        path.write_text(text)
    return config.load(path=path or "/dev/null", env=env)


def test_defaults_match_the_spec() -> None:
    s = load()
    assert s.upstream.base_url == "https://api.apiyi.com/v1"
    assert s.upstream.read_timeout == 360
    assert s.store.url == "memory://"
    assert s.auth.mode == "keys"
    assert s.policy.n == "reject"
    assert s.policy.default_response_format == "b64_json"
    assert s.policy.max_body_bytes == 64 * 1024
    assert s.policy.max_edit_body_bytes == 64 * 1024 * 1024
    assert s.model("gpt-image-2-vip") is not None
    assert s.model("gpt-image-2-vip").price_micros == 30_000  # type: ignore[union-attr]
    assert s.server.graceful_timeout_seconds > s.upstream.read_timeout


def test_fixed_environment_names() -> None:
    s = load(
        APIYI_PROXY_UPSTREAM_URL="http://127.0.0.1:9/v1",
        APIYI_API_KEY="upstream-key",
        APIYI_PROXY_STORE_URL="redis://127.0.0.1:1/0",
        APIYI_PROXY_KEY_PEPPER="pepper",
        APIYI_PROXY_AUTH_MODE="passthrough",
        APIYI_PROXY_ADMIN_TOKEN="admin",
        APIYI_PROXY_N_POLICY="fanout",
        APIYI_PROXY_SERVER__PORT="9001",
        APIYI_PROXY_LOG__ACCESS_LOG="false",
    )
    assert s.upstream.base_url == "http://127.0.0.1:9/v1"
    assert s.upstream.api_key == "upstream-key"
    assert s.store.url == "redis://127.0.0.1:1/0"
    assert s.auth.mode == "passthrough" and s.auth.admin_token == "admin"
    assert s.policy.n == "fanout"
    assert s.server.port == 9001
    assert s.log.access_log is False


def test_yaml_file_and_env_override(tmp_path: Path) -> None:
    text = "server:\n  port: 7000\npolicy:\n  unsupported_fields: reject\n"
    s = load(text, tmp_path, APIYI_PROXY_SERVER__PORT="7001")
    assert s.server.port == 7001
    assert s.policy.unsupported_fields == "reject"


@pytest.mark.parametrize(
    ("text", "env", "field"),
    [
        ("server:\n  port: 0\n", {}, "server.port"),
        ("server:\n  port: many\n", {}, "server.port"),
        ("policy:\n  n: lots\n", {}, "policy.n"),
        ("policy:\n  default_model: nope\n", {}, "policy.default_model"),
        ("policy:\n  model_aliases: {a: nope}\n", {}, "policy.model_aliases.a"),
        ("store:\n  url: mysql://x\n", {}, "store.url"),
        ("store:\n  results_url: /tmp/results\n", {}, "store.results_url"),
        ("upstream:\n  bogus: 1\n", {}, "upstream.bogus"),
        ("upstream:\n  api_key: sk-in-file\n", {}, "upstream.api_key"),
        ("ledger:\n  timezone: Mars/Olympus\n", {}, "ledger.timezone"),
        ("", {"APIYI_PROXY_STORE_URL": "redis://x:1/0"}, "auth.key_pepper"),
        ("server:\n  workers: 2\n", {}, "server.workers"),
        ("server:\n  max_connections: 0\n", {}, "server.max_connections"),
        ("server:\n  max_header_bytes: 100\n", {}, "server.max_header_bytes"),
        ("server:\n  head_timeout_seconds: 0\n", {}, "server.head_timeout_seconds"),
        ("", {"APIYI_PROXY_SERVER__BODY_TIMEOUT_SECONDS": "-1"}, "server.body_timeout_seconds"),
        ("server:\n  body_min_bytes_per_second: 0\n", {}, "server.body_min_bytes_per_second"),
        ("server:\n  keepalive_timeout_seconds: 0\n", {}, "server.keepalive_timeout_seconds"),
        ("- a list\n", {}, "config file"),
        ("", {"APIYI_PROXY_NOPE__X": "1"}, "APIYI_PROXY_NOPE__X"),
        ("ledger:\n  default_daily_usd: 0.0000001\n", {}, "ledger.default_daily_usd"),
        ("ledger:\n  default_monthly_usd: -1\n", {}, "ledger.default_monthly_usd"),
        ("ledger:\n  default_rpm: -1\n", {}, "ledger.default_rpm"),
        ("ledger:\n  teams: {d: {daily_usd: 0.0000001}}\n", {}, "ledger.teams.d.daily_usd"),
        ("ledger:\n  teams: {d: {monthly_usd: -5}}\n", {}, "ledger.teams.d.monthly_usd"),
        ("ledger:\n  teams: {d: {rpm: 5}}\n", {}, "ledger.teams.d.rpm"),
        ("ledger:\n  teams: {'a|b': {daily_usd: 1}}\n", {}, "ledger.teams.a|b"),
    ],
)
def test_bad_config_names_the_field(
    tmp_path: Path, text: str, env: dict[str, str], field: str
) -> None:
    with pytest.raises(config.ConfigError) as info:
        load(text, tmp_path, **env)
    assert field in str(info.value)


def test_replay_bodies_live_beside_a_shared_ledger_unless_told_otherwise() -> None:
    pepper = {"APIYI_PROXY_KEY_PEPPER": "pepper"}
    alone = load()
    assert alone.store.replay_url == "memory://" and not alone.store.replays_local
    shared = load(APIYI_PROXY_STORE_URL="redis+cluster://r:7000", **pepper)
    assert shared.store.replay_url == "redis+cluster://r:7000"
    assert not shared.store.replays_local
    apart = load(
        APIYI_PROXY_STORE_URL="redis://ledger:6379/0",
        APIYI_PROXY_STORE__RESULTS_URL="redis://results:6379/0",
        **pepper,
    )
    assert apart.store.replay_url == "redis://results:6379/0"
    local = load(
        APIYI_PROXY_STORE_URL="redis://ledger:6379/0",
        APIYI_PROXY_STORE__RESULTS_URL="memory://",
        **pepper,
    )
    assert local.store.replay_url == "memory://" and local.store.replays_local


def test_masked_hides_secrets() -> None:
    s = load(APIYI_API_KEY="upstream-secret", APIYI_PROXY_ADMIN_TOKEN="admin-secret")
    text = repr(s.masked()) + repr(s)
    assert "upstream-secret" not in text and "admin-secret" not in text


def all_fields() -> set[str]:
    defaults = config.Settings()
    return {
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(defaults)
        for f in dataclasses.fields(getattr(defaults, section.name))
    }


def test_example_config_documents_every_field_and_loads() -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    documented = {f"{section}.{name}" for section, values in data.items() for name in values}
    secrets = {f"{s}.{n}" for s, n in config.SECRET_FIELDS}
    assert documented | secrets == all_fields()
    s = config.load(path=EXAMPLE, env={})
    assert s == dataclasses.replace(config.load(path="/dev/null", env={}))


def test_config_limits_null_is_no_limit_and_zero_is_nothing(tmp_path: Path) -> None:
    text = (
        "ledger:\n"
        "  default_daily_usd: 0\n"
        "  default_rpm: 30\n"
        "  teams:\n"
        "    design: {daily_usd: 0.09, monthly_usd: null}\n"
        "    frozen: {daily_usd: 0}\n"
        "    open: null\n"
    )
    s = load(text, tmp_path)
    assert s.ledger.default_limits() == Limits(daily_micros=0, rpm=30)
    assert s.ledger.team_seeds() == {
        "design": Limits(daily_micros=90_000),
        "frozen": Limits(daily_micros=0),
        "open": Limits(),
    }
    assert load().ledger.default_limits() == Limits()  # the default: no limit
