"""Settings: one typed, frozen object, resolved and validated once at start-up.

Sources, later ones winning: embedded defaults, the YAML file (``--config``,
``APIYI_PROXY_CONFIG`` or ``config/proxy.yaml`` if present), environment variables.
Secrets (the upstream key, the admin token, the key pepper) come only from the
environment. This is the only module that reads ``os.environ``.

Environment variables: the fixed names of SPEC section 9 (``APIYI_PROXY_UPSTREAM_URL``,
``APIYI_PROXY_STORE_URL``, ``APIYI_PROXY_AUTH_MODE``, ``APIYI_PROXY_N_POLICY``), and for
any other field ``APIYI_PROXY_<SECTION>__<FIELD>`` (``APIYI_PROXY_SERVER__PORT=9000``).
The command line also reads ``APIYI_PROXY_URL`` (``admin_target``): the running proxy
whose admin API ``keys``, ``teams`` and ``usage`` use.

Types are checked by pydantic as strictly as JSON states them (no ``"8080"``, ``8080.0``
or ``true`` for an integer); every error names the field by its dotted path. The types
themselves live in ``proxy.settings`` and are exported from here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from .limits import LimitError
from .redis_url import RedisTarget, RedisURLError
from .schemas import field_path
from .settings import (
    REQUEST_LOG_MAX_MEMORY,
    REQUEST_LOG_MAX_SHARED,
    SECRET_FIELDS,
    AlertSettings,
    AuthSettings,
    LedgerSettings,
    LogSettings,
    ModelSettings,
    PolicySettings,
    ServerSettings,
    Settings,
    StoreSettings,
    UpstreamSettings,
    WebhookSettings,
    url_host,
)

# The types are exported from here too: the rest of the code imports them from config.
__all__ = [
    "ADMIN_TOKEN_ENV",
    "FIXED_ENV",
    "REQUEST_LOG_MAX_MEMORY",
    "REQUEST_LOG_MAX_SHARED",
    "SECRET_ENV",
    "SECRET_FIELDS",
    "AdminTarget",
    "AlertSettings",
    "AuthSettings",
    "ConfigError",
    "LedgerSettings",
    "LogSettings",
    "ModelSettings",
    "PolicySettings",
    "ServerSettings",
    "Settings",
    "StoreSettings",
    "UpstreamSettings",
    "WebhookSettings",
    "admin_target",
    "check_serving",
    "load",
    "url_host",
    "worker_environment",
]

ENV_PREFIX = "APIYI_PROXY_"
STORE_SCHEMES = ("memory", "redis", "rediss", "redis+cluster", "redis+sentinel")
DEFAULT_CONFIG_PATH = Path("config/proxy.yaml")
# Where the command line finds a running proxy, and the token its admin API needs.
PROXY_URL_ENV = "APIYI_PROXY_URL"
ADMIN_TOKEN_ENV = "APIYI_PROXY_ADMIN_TOKEN"

# Fixed environment names (SPEC section 9): name -> (section, field).
FIXED_ENV = {
    "APIYI_PROXY_UPSTREAM_URL": ("upstream", "base_url"),
    "APIYI_PROXY_STORE_URL": ("store", "url"),
    "APIYI_PROXY_AUTH_MODE": ("auth", "mode"),
    "APIYI_PROXY_N_POLICY": ("policy", "n"),
}


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the field."""


SECRET_ENV = {
    "APIYI_API_KEY": ("upstream", "api_key"),
    ADMIN_TOKEN_ENV: ("auth", "admin_token"),
    "APIYI_PROXY_KEY_PEPPER": ("auth", "key_pepper"),
    "APIYI_PROXY_METRICS_TOKEN": ("auth", "metrics_token"),
}
# The proxy's own secrets (not the upstream's key, whose shape the provider decides)
# must be at least this long: 32 characters of `openssl rand -hex 32` are 128 bits.
MIN_SECRET_CHARS = 32
PLACEHOLDER_MARKS = ("REPLACE_ME", "CHANGE_ME", "CHANGEME")


def load(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Resolve settings from defaults, the YAML file, the environment and CLI overrides."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    config_path = _config_path(path, env)
    if config_path is not None:
        raw = _read_yaml(config_path)
    for section, name in SECRET_FIELDS:
        if isinstance(raw.get(section), dict) and name in raw[section]:
            raise ConfigError(f"{section}.{name}: secrets come only from the environment")
    _apply_env(raw, env)
    for section, values in (overrides or {}).items():
        for name, value in values.items():
            if value is not None:
                raw.setdefault(section, {})[name] = value
    settings = _build(raw)
    settings = _webhook_secrets(settings, env)
    _validate(settings)
    return settings


def _webhook_secrets(settings: Settings, env: Mapping[str, str]) -> Settings:
    """Each webhook's secret, read from the variable its ``secret_env`` names."""
    hooks = []
    for i, hook in enumerate(settings.alerts.webhooks):
        if hook.secret_env is not None:
            where = f"alerts.webhooks[{i}]"
            if hook.secret is not None:
                raise ConfigError(f"{where}.secret_env: give secret or secret_env, not both")
            secret = env.get(hook.secret_env)
            if not secret:
                raise ConfigError(f"{where}.secret_env: {hook.secret_env} is not set")
            hook = dataclasses.replace(hook, secret=secret)
        hooks.append(hook)
    alerts = dataclasses.replace(settings.alerts, webhooks=tuple(hooks))
    return dataclasses.replace(settings, alerts=alerts)


def _config_path(path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path | None:
    if path is not None:
        return Path(path)
    if env.get("APIYI_PROXY_CONFIG"):
        return Path(env["APIYI_PROXY_CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def worker_environment(
    settings: Settings, path: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """What worker processes need in their environment to load these same settings:
    the config file, and the server fields that command-line flags may have set."""
    server = settings.server
    env = {
        f"{ENV_PREFIX}SERVER__HOST": server.host,
        f"{ENV_PREFIX}SERVER__PORT": str(server.port),
        f"{ENV_PREFIX}SERVER__WORKERS": str(server.workers),
        f"{ENV_PREFIX}SERVER__FAKE_UPSTREAM": "true" if server.fake_upstream else "false",
    }
    if path is not None:
        env[f"{ENV_PREFIX}CONFIG"] = os.fspath(path)
    return env


@dataclass(frozen=True)
class AdminTarget:
    """A running proxy's admin API, as the command line reaches it."""

    url: str
    token: str = field(repr=False)


def admin_target(
    url: str | None = None, env: Mapping[str, str] | None = None
) -> AdminTarget | None:
    """The proxy that ``keys``, ``teams`` and ``usage`` talk to: ``url`` (``--url``), else
    ``APIYI_PROXY_URL``; None when neither is set (they then work on the store itself)."""
    env = os.environ if env is None else env
    url = url or env.get(PROXY_URL_ENV) or None
    if url is None:
        return None
    where = f"--url / {PROXY_URL_ENV}"
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: must be the proxy's http:// or https:// address")
    if parts.username or parts.password:
        raise ConfigError(
            f"{where}: no credentials in the URL; the admin token comes from {ADMIN_TOKEN_ENV}"
        )
    path = parts.path.rstrip("/")
    # The address clients use (OPENAI_BASE_URL, with /v1) names the same proxy.
    path = path.removesuffix("/v1")
    token = env.get(ADMIN_TOKEN_ENV) or ""
    if not token:
        raise ConfigError(f"{ADMIN_TOKEN_ENV}: set it to the proxy's admin token to use {where}")
    return AdminTarget(urlunsplit((parts.scheme, parts.netloc, path, "", "")), token)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    sections = typing.get_type_hints(Settings)
    for name, value in env.items():
        if name in FIXED_ENV:
            section, key = FIXED_ENV[name]
        elif name in SECRET_ENV:
            section, key = SECRET_ENV[name]
        elif name.startswith(ENV_PREFIX) and "__" in name:
            section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
            if section not in sections:
                raise ConfigError(f"{name}: unknown section {section!r}")
        else:
            continue
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: must be a mapping")
        # A secret or text field takes the variable as written (a pepper of digits stays text).
        text = name in SECRET_ENV or typing.get_type_hints(sections[section]).get(key) is str
        raw[section][key] = value if text else _parse_env_value(value)


def _parse_env_value(value: str) -> Any:
    # YAML scalars give numbers and booleans their types; lists and maps stay YAML.
    try:
        return yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        return value


@functools.cache
def _adapter() -> TypeAdapter[Settings]:
    return TypeAdapter(Settings)


def _build(raw: dict[str, Any]) -> Settings:
    """Check types as strictly as JSON states them: an integer field takes no ``8080.0``,
    ``"8080"`` or ``true``, a number field takes integers, a text field only text."""
    try:
        data = json.dumps(raw, default=str)
    except (TypeError, ValueError) as exc:  # keys YAML may give that JSON cannot, cycles
        raise ConfigError(f"config: {exc}") from None
    try:
        return _adapter().validate_json(data, strict=True)
    except ValidationError as exc:
        raise ConfigError(_explain(exc.errors()[0])) from None


_EXPECTED = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "dataclass_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "tuple_type": "must be a list",
    "missing": "must be set",
    "unexpected_keyword_argument": "unknown setting",
}


def _explain(error: ErrorDetails) -> str:
    """One validation error as ``section.field[i]: why, got value``."""
    where = field_path(error["loc"])
    kind, value = error["type"], error["input"]
    if kind == "literal_error":
        why = f"must be {error.get('ctx', {}).get('expected')}"  # 'a', 'b' or 'c'
    else:
        why = _EXPECTED.get(kind, error["msg"])
    if kind not in ("missing", "unexpected_keyword_argument") and not isinstance(
        value, dict | list
    ):
        why += f", got {value!r}"
    return f"{where or 'config'}: {why}"


def check_serving(s: Settings) -> None:
    """What ``serve`` needs beyond valid settings; ``check-config`` runs it too, so the
    two refuse the same things."""
    if s.auth.mode == "keys" and not s.upstream.api_key and not s.server.fake_upstream:
        raise ConfigError(
            "upstream.api_key: set APIYI_API_KEY (or try `apiyi-proxy serve --fake-upstream`)"
        )


def _check_secret(s: Settings, section: str, name: str) -> None:
    value: str | None = getattr(getattr(s, section), name)
    if not value:
        return
    variable = next(env for env, where in SECRET_ENV.items() if where == (section, name))
    if any(mark in value.upper() for mark in PLACEHOLDER_MARKS):
        raise ConfigError(
            f"{section}.{name}: {variable} is still the example's placeholder; set a real secret"
        )
    if (section, name) != ("upstream", "api_key") and len(value) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"{section}.{name}: {variable} must be at least {MIN_SECRET_CHARS} characters "
            f"(it has {len(value)}); make one with `openssl rand -hex 32`"
        )


def _validate(s: Settings) -> None:
    def need(ok: bool, where: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: {why}")

    names = [m.name for m in s.policy.models]
    need(bool(names), "policy.models", "at least one model is required")
    need(len(set(names)) == len(names), "policy.models", "model names must be unique")
    for i, m in enumerate(s.policy.models):
        need(m.price_usd >= 0, f"policy.models[{i}].price_usd", "must be >= 0")
    need(s.policy.default_model in names, "policy.default_model", "must name a configured model")
    for alias, target in s.policy.model_aliases.items():
        need(target in names, f"policy.model_aliases.{alias}", f"unknown model {target!r}")
    need(1 <= s.policy.max_n <= 10, "policy.max_n", "must be 1..10")
    need(s.policy.max_prompt_chars > 0, "policy.max_prompt_chars", "must be > 0")
    need(s.policy.max_body_bytes >= 1024, "policy.max_body_bytes", "must be >= 1024")
    need(s.policy.max_edit_body_bytes >= 1024, "policy.max_edit_body_bytes", "must be >= 1024")
    need(
        s.upstream.base_url.startswith(("http://", "https://")),
        "upstream.base_url",
        "must be an http:// or https:// URL",
    )
    for name in ("connect_timeout", "read_timeout", "write_timeout", "total_timeout_seconds"):
        need(getattr(s.upstream, name) > 0, f"upstream.{name}", "must be > 0")
    need(s.upstream.max_connections >= 1, "upstream.max_connections", "must be >= 1")
    need(
        s.upstream.account_poll_seconds >= 0,
        "upstream.account_poll_seconds",
        "must be >= 0 (0 turns polling off)",
    )
    for where, url in (("store.url", s.store.url), ("store.results_url", s.store.replay_url)):
        scheme = url.partition("://")[0]
        need(
            scheme in STORE_SCHEMES,
            where,
            "scheme must be memory, redis, rediss, redis+cluster or redis+sentinel",
        )
        if scheme in ("redis", "rediss"):
            try:
                RedisTarget.from_url(url)  # also loads the TLS files it names
            except RedisURLError as error:
                raise ConfigError(f"{where}: {error}") from None
    need(s.store.timeout_seconds > 0, "store.timeout_seconds", "must be > 0")
    need(s.ledger.lease_seconds >= 1, "ledger.lease_seconds", "must be >= 1")
    need(s.store.results_max_bytes >= 0, "store.results_max_bytes", "must be >= 0")
    need(s.store.results_total_bytes >= 0, "store.results_total_bytes", "must be >= 0")
    need(s.store.request_log_cap >= 0, "store.request_log_max", "must be >= 0 (0: no log)")
    need(1 <= s.server.port <= 65535, "server.port", "must be 1..65535")
    need(s.server.workers >= 1, "server.workers", "must be >= 1")
    need(
        s.server.workers == 1 or s.store.shared,
        "server.workers",
        "several workers need a shared store (store.url redis://...); memory:// is per process",
    )
    need(s.server.max_connections >= 1, "server.max_connections", "must be >= 1")
    need(s.server.max_header_bytes >= 1024, "server.max_header_bytes", "must be >= 1024")
    for name in ("head_timeout_seconds", "body_timeout_seconds", "keepalive_timeout_seconds"):
        need(getattr(s.server, name) > 0, f"server.{name}", "must be > 0")
    need(
        s.server.body_min_bytes_per_second >= 1,
        "server.body_min_bytes_per_second",
        "must be >= 1",
    )
    need(
        s.server.graceful_timeout_seconds >= 0,
        "server.graceful_timeout_seconds",
        "must be >= 0",
    )
    for section, name in SECRET_FIELDS:
        _check_secret(s, section, name)
    if s.store.shared and s.auth.mode == "keys":
        need(
            bool(s.auth.key_pepper),
            "auth.key_pepper",
            "APIYI_PROXY_KEY_PEPPER must be set with a shared store, or keys stop "
            "matching after a restart",
        )
    _validate_alerts(s.alerts)
    try:
        s.ledger.default_limits()
    except LimitError as error:
        raise ConfigError(
            f"ledger.default_{error.field}: {error.reason}, or null for no limit"
        ) from None
    try:
        s.ledger.team_seeds()
    except LimitError as error:
        raise ConfigError(f"ledger.teams.{error.field}: {error.reason}") from None
    try:
        import zoneinfo

        zoneinfo.ZoneInfo(s.ledger.timezone)
    except (ValueError, KeyError, zoneinfo.ZoneInfoNotFoundError) as exc:
        raise ConfigError(f"ledger.timezone: unknown time zone {s.ledger.timezone!r}") from exc


def _validate_alerts(a: AlertSettings) -> None:
    def need(ok: bool, where: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"alerts.{where}: {why}")

    for i, t in enumerate(a.thresholds):
        need(0 < t <= 1000, f"thresholds[{i}]", f"must be a percentage in (0, 1000], got {t:g}")
    need(
        list(a.thresholds) == sorted(set(a.thresholds)),
        "thresholds",
        "must be sorted, each percentage once",
    )
    need(a.max_attempts >= 1, "max_attempts", "must be >= 1")
    need(a.backoff_seconds >= 0, "backoff_seconds", "must be >= 0")
    need(a.timeout_seconds > 0, "timeout_seconds", "must be > 0")
    need(a.max_pending >= 1, "max_pending", "must be >= 1")
    for i, hook in enumerate(a.webhooks):
        parts = urlsplit(hook.url)
        need(
            parts.scheme in ("http", "https") and bool(parts.hostname),
            f"webhooks[{i}].url",
            "must be an http:// or https:// URL",
        )
        if hook.secret is None:
            need(
                hook.format == "slack",
                f"webhooks[{i}].secret",
                "a json webhook is signed: name the variable holding its secret with secret_env",
            )
            continue
        need(
            not any(mark in hook.secret.upper() for mark in PLACEHOLDER_MARKS),
            f"webhooks[{i}].secret",
            "still the example's placeholder; set a real secret",
        )
