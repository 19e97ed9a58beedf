"""The settings' types: one frozen dataclass per section, gathered in ``Settings``.

The defaults are the embedded ones; ``proxy.config`` loads the YAML file and the
environment over them, checks the result and exports these types as well.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import with_config

from .limits import TEAM_LIMIT_FIELDS, LimitError, Limits, limit_changes, team_name


@dataclass(frozen=True)
class ModelSettings:
    """One upstream model the proxy serves."""

    name: str
    price_usd: float = 0.03
    # Explicit sizes; empty means the built-in table for the model's family.
    sizes: tuple[str, ...] = ()

    @property
    def price_micros(self) -> int:
        return round(self.price_usd * 1_000_000)


def _default_models() -> tuple[ModelSettings, ...]:
    return (ModelSettings("gpt-image-2-vip"), ModelSettings("gpt-image-2-all"))


@dataclass(frozen=True)
class UpstreamSettings:
    base_url: str = "https://api.apiyi.com/v1"
    api_key: str | None = field(default=None, repr=False)
    client: Literal["aiohttp", "httpx"] = "aiohttp"
    connect_timeout: float = 10.0
    read_timeout: float = 360.0
    write_timeout: float = 60.0
    # The whole call, however the upstream trickles its bytes (the provider
    # recommends 360 s); holds stay valid for as long as a call can live.
    total_timeout_seconds: float = 360.0
    max_connections: int = 10_000
    keepalive_seconds: float = 60.0
    # How often the account's balance and usage are read (proxy/account.py); 0: never.
    account_poll_seconds: float = 60.0


@dataclass(frozen=True)
class PolicySettings:
    default_model: str = "gpt-image-2-vip"
    models: tuple[ModelSettings, ...] = field(default_factory=_default_models)
    model_aliases: Mapping[str, str] = field(
        default_factory=lambda: {
            "gpt-image-1": "gpt-image-2-vip",
            "gpt-image-1.5": "gpt-image-2-vip",
            "gpt-image-1-mini": "gpt-image-2-all",
            "dall-e-3": "gpt-image-2-vip",
        }
    )
    size_aliases: Mapping[str, str] = field(
        default_factory=lambda: {
            "1024x1024": "1280x1280",
            "1536x1024": "1280x848",
            "1024x1536": "848x1280",
        }
    )
    n: Literal["reject", "strip", "fanout"] = "reject"
    max_n: int = 10
    unsupported_fields: Literal["strip", "reject"] = "strip"
    default_response_format: Literal["url", "b64_json"] = "b64_json"
    b64_prefix: Literal["strip", "keep"] = "strip"
    max_prompt_chars: int = 32_000
    # Each body limit is raised to what a prompt of max_prompt_chars needs at worst
    # (policy.body_limit: 12 bytes a character plus 16 KiB, 400,384 bytes by default).
    max_body_bytes: int = 64 * 1024
    max_edit_body_bytes: int = 64 * 1024 * 1024
    max_edit_images: int = 16


# Default sizes of the per-request log: a record takes about 150 bytes in Redis and
# about 350 in this process's memory.
REQUEST_LOG_MAX_SHARED = 1_000_000
REQUEST_LOG_MAX_MEMORY = 100_000


@dataclass(frozen=True)
class StoreSettings:
    url: str = "memory://"
    # Every store call is bounded by this; past it the request fails closed (503).
    timeout_seconds: float = 0.5
    on_error: Literal["closed", "open"] = "closed"
    key_prefix: str = "apiyi"
    max_connections: int = 64
    # Replay bodies of idempotent calls. Unset: the ledger's own Redis when it is
    # shared (so every replica can replay), local disk when it is memory://. Either
    # way their total is capped, so a large image can never crowd out the ledger.
    results_url: str | None = None
    results_max_bytes: int = 32 * 1024 * 1024
    results_total_bytes: int = 512 * 1024 * 1024
    # Records kept by the per-request log (GET /admin/requests); 0 turns it off.
    # Unset: 1,000,000 in a Redis store, 100,000 in memory://.
    request_log_max: int | None = None

    @property
    def shared(self) -> bool:
        """The ledger lives in Redis, shared by every replica and worker."""
        return not self.url.startswith("memory")

    @property
    def request_log_cap(self) -> int:
        if self.request_log_max is not None:
            return self.request_log_max
        return REQUEST_LOG_MAX_SHARED if self.shared else REQUEST_LOG_MAX_MEMORY

    @property
    def replay_url(self) -> str:
        """Where replay bodies live: ``results_url``, else beside a shared ledger."""
        if self.results_url:
            return self.results_url
        return self.url if self.shared else "memory://"

    @property
    def replays_local(self) -> bool:
        """Replay bodies stay in this process while the ledger is shared: a duplicate
        reaching another replica or worker cannot be replayed (it gets a 409)."""
        return self.shared and self.replay_url.startswith("memory")


@dataclass(frozen=True)
class AuthSettings:
    mode: Literal["keys", "passthrough"] = "keys"
    admin_token: str | None = field(default=None, repr=False)
    key_pepper: str | None = field(default=None, repr=False)
    # When set, /metrics on the main port needs "Authorization: Bearer <token>".
    metrics_token: str | None = field(default=None, repr=False)
    key_cache_seconds: float = 5.0


@dataclass(frozen=True)
class LedgerSettings:
    timezone: str = "UTC"
    # Slack past the upstream deadlines before a hold is given up as uncertain.
    hold_grace_seconds: float = 30.0
    # Holds, concurrency slots and idempotency claims are leased for this long and
    # renewed while their call lives: a crashed replica's are resolved (as uncertain
    # spend) within a lease and a sweep.
    lease_seconds: float = 15.0
    idempotency_ttl_seconds: int = 86_400
    # How long an SDK retry (x-stainless-retry-count >= 1) may join a finished call.
    retry_join_seconds: int = 600
    # Default limits for new keys: None is no limit, 0 allows nothing.
    default_daily_usd: float | None = None
    default_monthly_usd: float | None = None
    default_rpm: int | None = None
    default_concurrency: int | None = None
    # Seeds: created in the store when absent, never overwriting a team changed there.
    teams: Mapping[str, Mapping[str, float | None] | None] = field(default_factory=dict)

    def default_limits(self) -> Limits:
        """The limits of a new key (raises ``LimitError`` naming the field)."""
        values = {
            "daily_usd": self.default_daily_usd,
            "monthly_usd": self.default_monthly_usd,
            "rpm": self.default_rpm,
            "concurrency": self.default_concurrency,
        }
        return Limits(**limit_changes(values))

    def team_seeds(self) -> dict[str, Limits]:
        """The config file's teams and their budgets (raises ``LimitError``)."""
        seeds = {}
        for name, budget in self.teams.items():
            try:
                team_name(name)
                unknown = sorted(set(budget or {}) - set(TEAM_LIMIT_FIELDS))
                if unknown:
                    raise LimitError("unknown setting", unknown[0])
                seeds[name] = Limits(**limit_changes(budget or {}, TEAM_LIMIT_FIELDS))
            except LimitError as error:
                raise LimitError(error.reason, _join(name, error.field)) from None
        return seeds


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    # Above the upstream read timeout, so in-flight generations finish on shutdown.
    graceful_timeout_seconds: float = 380.0
    metrics_port: int | None = None
    fake_upstream: bool = False
    backlog: int = 4096
    limit_concurrency: int | None = None
    # The edge (proxy/edge.py): what one client may hold, and for how long, before the
    # proxy owes it an answer. None of these runs while a response is under way.
    max_connections: int = 10_000
    max_header_bytes: int = 16 * 1024
    head_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    body_min_bytes_per_second: int = 8 * 1024
    # Above the idle timeout of what reuses the connections (the SDK's pool: 5 s; nginx
    # and cloud load balancers: 60 s), so the proxy is never the side that closes first.
    keepalive_timeout_seconds: float = 75.0


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    access_log: bool = True


@dataclass(frozen=True)
class WebhookSettings:
    """One receiver of budget alerts. The URL may carry a token (Slack's do), so it is
    kept out of reprs and logs like the secret."""

    url: str = field(default="", repr=False)
    # The HMAC key of the signature header: from the environment variable that
    # ``secret_env`` names, or given whole through ``APIYI_PROXY_ALERTS__WEBHOOKS``.
    secret: str | None = field(default=None, repr=False)
    secret_env: str | None = None
    format: Literal["json", "slack"] = "json"


@dataclass(frozen=True)
class AlertSettings:
    webhooks: tuple[WebhookSettings, ...] = ()
    # Percentages of each daily and monthly budget of keys and teams.
    thresholds: tuple[float, ...] = (50.0, 80.0, 100.0)
    # Delivery: attempts at most, the first retry after backoff_seconds, doubling.
    max_attempts: int = 6
    backoff_seconds: float = 1.0
    timeout_seconds: float = 5.0
    max_pending: int = 1000  # deliveries queued or under way; past it an alert is dropped


@with_config(extra="forbid")  # the sections too: an unknown key is refused, named
@dataclass(frozen=True)
class Settings:
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    log: LogSettings = field(default_factory=LogSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)

    def model(self, name: str) -> ModelSettings | None:
        for model in self.policy.models:
            if model.name == name:
                return model
        return None

    def masked(self) -> dict[str, Any]:
        """The resolved settings as plain data with every secret masked."""
        data: dict[str, Any] = _plain(self)
        for section, name in SECRET_FIELDS:
            if data[section][name]:
                data[section][name] = "***"
        for hook in data["alerts"]["webhooks"]:
            hook["url"] = url_host(hook["url"]) + "/***"
            if hook["secret"]:
                hook["secret"] = "***"
        return data


def url_host(url: str) -> str:
    """``scheme://host[:port]`` of a URL: what may be shown of a webhook's address."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


def _plain(value: Any) -> Any:
    """Settings as dicts, lists and scalars (read-only mappings included, which
    ``dataclasses.asdict`` cannot copy)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


SECRET_FIELDS = (
    ("upstream", "api_key"),
    ("auth", "admin_token"),
    ("auth", "key_pepper"),
    ("auth", "metrics_token"),
)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name
