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
        APIYI_PROXY_KEY_PEPPER="pepper-for-tests-0123456789abcdef",
        APIYI_PROXY_AUTH_MODE="passthrough",
        APIYI_PROXY_ADMIN_TOKEN="admin-token-0123456789abcdef01234",
        APIYI_PROXY_N_POLICY="fanout",
        APIYI_PROXY_SERVER__PORT="9001",
        APIYI_PROXY_LOG__ACCESS_LOG="false",
    )
    assert s.upstream.base_url == "http://127.0.0.1:9/v1"
    assert s.upstream.api_key == "upstream-key"
    assert s.store.url == "redis://127.0.0.1:1/0"
    assert (
        s.auth.mode == "passthrough" and s.auth.admin_token == "admin-token-0123456789abcdef01234"
    )
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


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("APIYI_PROXY_STORE_URL", "store.url"),
        ("APIYI_PROXY_STORE__RESULTS_URL", "store.results_url"),
    ],
)
@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("ssl_cert_reqs=maybe", "ssl_cert_reqs must be none, optional or required"),
        ("ssl_check_hostname=off", "ssl_check_hostname must be true or false"),
        ("ssl_ca_certs=/no/such/ca.pem", "ssl_ca_certs: cannot use '/no/such/ca.pem'"),
        ("ssl_verify=none", "unknown option 'ssl_verify'"),
    ],
)
def test_a_store_url_the_store_could_not_use_is_refused_at_start_up(
    setting: str, field: str, query: str, reason: str
) -> None:
    env = {"APIYI_PROXY_STORE_URL": "redis://ledger:6379/0", "APIYI_PROXY_KEY_PEPPER": "p" * 32}
    env[setting] = f"rediss://app:store-password@cache:6380/0?{query}"
    with pytest.raises(config.ConfigError) as info:
        load(**env)
    assert str(info.value).startswith(f"{field}: {reason}")
    assert "store-password" not in str(info.value)


def test_replay_bodies_live_beside_a_shared_ledger_unless_told_otherwise() -> None:
    pepper = {"APIYI_PROXY_KEY_PEPPER": "pepper-for-tests-0123456789abcdef"}
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
    s = load(
        APIYI_API_KEY="upstream-secret", APIYI_PROXY_ADMIN_TOKEN="admin-secret-0123456789abcdef0123"
    )
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


# secrets: placeholders and short ones are refused, naming the field ---------------------

EXAMPLE_ENV = ROOT / "deploy" / ".env.example"


def example_env() -> dict[str, str]:
    """deploy/.env.example as it ships, as `cp .env.example .env` would use it."""
    pairs = (
        line.split("=", 1)
        for line in EXAMPLE_ENV.read_text().splitlines()
        if line and not line.startswith("#")
    )
    return {name: value for name, value in pairs if name.startswith("APIYI_")}


def test_the_shipped_env_example_is_refused_until_edited() -> None:
    env = example_env()
    assert env, "deploy/.env.example lists no settings"
    with pytest.raises(config.ConfigError) as info:
        load(**env)
    assert "REPLACE_ME" not in str(info.value)  # the field is named, the value is not
    assert "placeholder" in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("APIYI_PROXY_ADMIN_TOKEN", "REPLACE_ME_generate_with_openssl_rand_hex_32", "admin_token"),
        ("APIYI_PROXY_KEY_PEPPER", "replace_me-" + "x" * 40, "key_pepper"),
        ("APIYI_API_KEY", "REPLACE_ME_upstream_key", "upstream.api_key"),
        ("APIYI_PROXY_ADMIN_TOKEN", "a", "auth.admin_token"),
        ("APIYI_PROXY_ADMIN_TOKEN", "short-admin-token", "auth.admin_token"),
        ("APIYI_PROXY_ADMIN_TOKEN", "x" * 31, "auth.admin_token"),
        ("APIYI_PROXY_KEY_PEPPER", "x", "auth.key_pepper"),
    ],
)
def test_placeholder_and_short_secrets_are_refused(variable: str, value: str, field: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        load(**{variable: value})
    assert field in str(info.value)
    if len(value) > 1:
        assert value not in str(info.value)


def test_secrets_of_32_characters_and_real_upstream_keys_are_taken() -> None:
    s = load(
        APIYI_PROXY_ADMIN_TOKEN="x" * 32,
        APIYI_PROXY_KEY_PEPPER="y" * 64,
        APIYI_API_KEY="sk-short",  # the provider decides its keys' shape
    )
    assert s.auth.admin_token == "x" * 32


def test_serving_needs_the_upstream_key_unless_faked_or_passed_through() -> None:
    with pytest.raises(config.ConfigError) as info:
        config.check_serving(load())
    assert "upstream.api_key" in str(info.value)
    config.check_serving(load(APIYI_PROXY_SERVER__FAKE_UPSTREAM="true"))
    config.check_serving(load(APIYI_PROXY_AUTH_MODE="passthrough"))
    config.check_serving(load(APIYI_API_KEY="sk-upstream"))
