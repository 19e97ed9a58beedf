"""Prometheus metrics, bound to a registry handed in (SPEC section 8).

Labels are bounded: route templates (never raw paths), configured model names,
status classes (``2xx``), team names from the key records, and the fixed
vocabularies below (``Rejection``, ``UpstreamOutcome``, ``STORE_OPERATIONS``…).
No key, secret or request id is ever a label.

Every label set a panel or an alert reads exists at 0 before its first increase, or
``rate()`` and ``increase()`` would miss that increase: fixed vocabularies are
created with the metrics, models and teams as the proxy learns them (``learn``).
``PRESETS`` says which label sets each family gets.

Money is counted in integer micro-dollars and shown in USD at exposition, so sums
stay exact (0.1 + 0.2 shows 0.3), in one process or aggregated across workers.

Under ``serve --workers N`` the CLI points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
directory before the workers start; ``/metrics`` then aggregates every worker's files.
"""

from __future__ import annotations

import enum
import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Final, Generic, Literal, TypeVar, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import (
    BodyTooLarge,
    BudgetExceeded,
    Conflict,
    Forbidden,
    IdempotencyMismatch,
    InvalidRequest,
    ProxyError,
    RateLimited,
    StoreUnavailable,
    Unauthorized,
)
from .money import Outcome, Resolution
from .store import Refusal

PREFIX: Final = "apiyi_proxy"

# 1 ms to 400 s: proxy overhead lives at the bottom, upstream generations at the top.
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 150.0, 190.0, 240.0, 300.0, 360.0, 400.0,
)  # fmt: skip
OVERHEAD_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
STORE_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 0.5, 1.0)  # fmt: skip

# label vocabularies ------------------------------------------------------------------
IMAGE_ROUTES: Final = ("/v1/images/generations", "/v1/images/edits")
NO_MODEL: Final = "-"  # a request refused before its model was known
NO_TEAM: Final = "none"  # a key without a team
# "499": the client left before any answer.
STATUS_CLASSES: Final = ("2xx", "4xx", "5xx", "499")
HOLD_EXPIRED: Final = "expired"
HOLD_OUTCOMES: Final = (*(r.value for r in Resolution), HOLD_EXPIRED)
REPLAY_KINDS: Final = ("idempotency_key", "sdk_retry")
BUDGET_ALERT_RESULTS: Final = ("delivered", "failed", "dropped")  # alerts.Delivery
TOP_KEYS: Final = 10  # keys shown by top_key_spend_usd, per period
# What each store call is counted as; mypy holds every caller of ``Ledger.call`` to it.
StoreOperation = Literal[
    "admin", "alerts", "expire", "idempotency", "key", "ping", "renew", "reserve", "settle",
    "tally", "teams", "usage",
]  # fmt: skip
STORE_OPERATIONS: Final[tuple[str, ...]] = get_args(StoreOperation)


class Rejection(enum.Enum):
    """Why the proxy itself refused an image request; the value is the ``reason`` label."""

    INVALID_REQUEST = "invalid_request"  # the request broke a rule (400, 413)
    UNAUTHORIZED = "unauthorized"  # no key, an unknown or a revoked key (401)
    MODEL_NOT_ALLOWED = "model_not_allowed"  # the key may not use the model (403)
    IDEMPOTENCY = "idempotency"  # a duplicate that can neither join nor replay (409, 422)
    RPM = "rpm"
    CONCURRENCY = "concurrency"
    ZERO_LIMIT = "zero_limit"  # the key's rpm or concurrency is 0
    BUDGET_KEY_DAILY = "budget_key_daily"
    BUDGET_KEY_MONTHLY = "budget_key_monthly"
    BUDGET_TEAM_DAILY = "budget_team_daily"
    BUDGET_TEAM_MONTHLY = "budget_team_monthly"
    STORE_UNAVAILABLE = "store_unavailable"  # failing closed (503)


class StoreRefused(Exception):
    """The store's refusal behind an error the ledger raises (its ``__cause__``)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.value)
        self.refusal = refusal


_REJECTION_OF_REFUSAL: Final = {
    Refusal.UNKNOWN_KEY: Rejection.UNAUTHORIZED,
    Refusal.REVOKED: Rejection.UNAUTHORIZED,
    Refusal.RPM: Rejection.RPM,
    Refusal.CONCURRENCY: Rejection.CONCURRENCY,
    Refusal.ZERO_LIMIT: Rejection.ZERO_LIMIT,
    Refusal.KEY_DAILY: Rejection.BUDGET_KEY_DAILY,
    Refusal.KEY_MONTHLY: Rejection.BUDGET_KEY_MONTHLY,
    Refusal.TEAM_DAILY: Rejection.BUDGET_TEAM_DAILY,
    Refusal.TEAM_MONTHLY: Rejection.BUDGET_TEAM_MONTHLY,
    Refusal.CANCELLED: Rejection.STORE_UNAVAILABLE,
}
# The proxy's own refusals by error class; the upstream's answers (UpstreamFailed,
# UpstreamStatus, UpstreamTimeout) are not refusals and are counted by upstream outcome.
_REJECTION_OF_ERROR: Final[dict[type[ProxyError], Rejection]] = {
    InvalidRequest: Rejection.INVALID_REQUEST,
    BodyTooLarge: Rejection.INVALID_REQUEST,
    Unauthorized: Rejection.UNAUTHORIZED,
    Forbidden: Rejection.MODEL_NOT_ALLOWED,
    Conflict: Rejection.IDEMPOTENCY,
    IdempotencyMismatch: Rejection.IDEMPOTENCY,
    # Raised by the ledger alone, with the store's refusal as cause; these are fallbacks.
    RateLimited: Rejection.RPM,
    BudgetExceeded: Rejection.BUDGET_KEY_DAILY,
    StoreUnavailable: Rejection.STORE_UNAVAILABLE,
}


def rejection(error: ProxyError) -> Rejection | None:
    """Why the proxy refused, if ``error`` is its own refusal (None for the upstream's)."""
    cause = error.__cause__
    if isinstance(cause, StoreRefused):
        return _REJECTION_OF_REFUSAL[cause.refusal]
    for kind in type(error).__mro__:
        found = _REJECTION_OF_ERROR.get(kind)
        if found is not None:
            return found
    return None


class UpstreamOutcome(enum.Enum):
    """How one upstream call ended; the value is the ``outcome`` label of upstream calls.

    ``money.Outcome`` with its ``refused`` split: what the operator must act on (the
    account's quota, the proxy's key) apart from what the caller asked wrongly.
    """

    OK = "ok"
    QUOTA = "quota"  # the proxy's upstream account is out of quota
    AUTH = "auth"  # the upstream refused the proxy's own key
    RATE_LIMITED = "rate_limited"  # a 429: the upstream is busy
    REFUSED = "refused"  # any other 4xx: moderation, a bad request, a caller's own key
    ERROR = "error"
    ERROR_IN_200 = "error_in_200"
    NOT_SENT = "not_sent"
    TIMEOUT = "timeout"
    LOST = "lost"
    CUT = "cut"
    CUT_EARLY = "cut_early"
    CRASH = "crash"

    @classmethod
    def of(cls, outcome: Outcome) -> UpstreamOutcome:
        """The label of a call whose outcome needs no upstream answer to refine it."""
        return cls(outcome.value)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


M = TypeVar("M", Counter, Gauge, Histogram)


class Labelled(Generic[M]):
    """A labelled metric whose children are looked up once per label set.

    ``labels()`` of the client library validates and locks on every call; on the
    request path the same few label sets recur, so each child is kept once found.
    Label values are bounded by design (see the module docstring).
    """

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Learned(enum.Enum):
    """Label values the proxy learns as it runs."""

    MODELS = "model"
    TEAMS = "team"


# Per label, where its preset values come from: fixed strings and learned values.
LabelValues = tuple[str | Learned, ...]
MODELS: Final[LabelValues] = (Learned.MODELS,)
TEAMS: Final[LabelValues] = (NO_TEAM, Learned.TEAMS)


def _fixed(values: Iterable[str]) -> LabelValues:
    return tuple(values)


class Metrics:
    """Every metric the proxy exports, created once per app."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # noise: one per label set
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        p = PREFIX
        self.requests = Labelled(
            Counter(f"{p}_requests", "Requests answered.", ["route", "model", "status_class"],
                    registry=r)
        )  # fmt: skip
        self.request_seconds = Labelled(
            Histogram(
                f"{p}_request_duration_seconds",
                "Time from request start to the last response byte.",
                ["route", "model", "status_class"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.upstream_seconds = Labelled(
            Histogram(
                f"{p}_upstream_duration_seconds",
                "Time from sending the upstream request to its last byte.",
                ["model", "outcome"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.upstream_calls = Labelled(
            Counter(
                f"{p}_upstream_calls",
                "Upstream calls by outcome: ok, or how the call failed (quota: the "
                "proxy's upstream account is out of quota).",
                ["model", "outcome"],
                registry=r,
            )
        )
        self.overhead_seconds = Labelled(
            Histogram(
                f"{p}_overhead_seconds",
                "Time the proxy itself adds: total minus upstream.",
                ["route"],
                buckets=OVERHEAD_BUCKETS,
                registry=r,
            )
        )
        self.images_billed = Labelled(
            Counter(f"{p}_images_billed", "Images the upstream bills for.", ["model", "team"],
                    registry=r)
        )  # fmt: skip
        self.images_returned = Labelled(
            Counter(f"{p}_images_returned", "Images returned to clients.", ["model", "team"],
                    registry=r)
        )  # fmt: skip
        # Shown in USD as apiyi_proxy_spend_usd_total (see MICRO_USD).
        self.spend_micros = Labelled(
            Counter(f"{p}_spend_micro_usd", "Money spent upstream, in USD.", ["model", "team"],
                    registry=r)
        )  # fmt: skip
        self.uncertain_micros = Labelled(
            Counter(
                f"{p}_uncertain_spend_micro_usd",
                "Spend kept because the upstream may have billed "
                "(timeouts, resets, expired holds), in USD.",
                ["model", "team"],
                registry=r,
            )
        )
        self.rejections = Labelled(
            Counter(
                f"{p}_rejections",
                "Image requests the proxy itself refused, by reason (the upstream's "
                "refusals are upstream call outcomes).",
                ["reason"],
                registry=r,
            )
        )
        self.in_flight = Labelled(
            Gauge(f"{p}_in_flight_requests", "Requests being served.", ["route"], registry=r,
                  multiprocess_mode="livesum")
        )  # fmt: skip
        self.holds_outstanding = Gauge(
            f"{p}_holds_outstanding",
            "Budget holds taken and not yet settled or released.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.holds_resolved = Labelled(
            Counter(
                f"{p}_holds_resolved",
                "Holds resolved, by outcome (settled, released, uncertain, expired).",
                ["outcome"],
                registry=r,
            )
        )
        self.budget_remaining_usd = Labelled(
            Gauge(
                f"{p}_budget_remaining_usd",
                "Budget left for a team in the current period (seen at each hold, and "
                "refreshed from the store every half minute).",
                ["team", "period"],
                registry=r,
                multiprocess_mode="mostrecent",
            )
        )
        self.budget_limit_usd = Labelled(
            Gauge(
                f"{p}_budget_limit_usd",
                "A team's budget for the period (day, month); 0 or absent means none.",
                ["team", "period"],
                registry=r,
                multiprocess_mode="mostrecent",
            )
        )
        self.top_key_spend_usd = Gauge(
            f"{p}_top_key_spend_usd",
            f"Spend of the {TOP_KEYS} keys that spent most today (period=day) and this "
            "month (period=month), read from the store every half minute.",
            ["key_id", "name", "period"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.store_errors = Labelled(
            Counter(f"{p}_store_errors", "Store calls that failed.", ["operation"], registry=r)
        )
        self.store_seconds = Labelled(
            Histogram(f"{p}_store_duration_seconds", "Store call latency.", ["operation"],
                      buckets=STORE_BUCKETS, registry=r)
        )  # fmt: skip
        self.settles_without_hold = Counter(
            f"{p}_settles_without_hold",
            "Settles that found no hold (the store lost its data) and booked the spend "
            "from the request itself.",
            registry=r,
        )
        self.key_change_subscription_losses = Counter(
            f"{p}_key_change_subscription_losses",
            "Times this process lost (or could not open) its subscription to key changes; "
            "until it is back, key records are cached for a second at most.",
            registry=r,
        )
        self.request_log_dropped = Counter(
            f"{p}_request_log_dropped",
            "Records of the per-request log not written: its queue was full or the store "
            "failed. The calls themselves were served and booked.",
            registry=r,
        )
        self.idempotent_replays = Labelled(
            Counter(
                f"{p}_idempotent_replays",
                "Calls answered from an earlier identical call instead of paying again.",
                ["kind"],
                registry=r,
            )
        )
        self.budget_alerts = Labelled(
            Counter(
                f"{p}_budget_alerts",
                "Budget alert webhook deliveries by result: delivered, failed (given up "
                "after its retries, or refused), dropped (too many pending).",
                ["result"],
                registry=r,
            )
        )
        self.account_poll_failures = Counter(
            f"{p}_upstream_account_poll_failures",
            "Polls of the upstream account endpoints that failed (timeout, 5xx, a bad "
            "answer); the account gauges keep the last values read.",
            registry=r,
        )
        self.account = AccountGauges()
        r.register(self.account)
        # The label sets created at 0 before anything is counted. Budget gauges are not
        # here: a 0 there would read as a spent budget.
        self.presets: tuple[tuple[Labelled[Counter] | Labelled[Gauge] | Labelled[Histogram],
                                  tuple[LabelValues, ...]], ...] = (
            (self.requests, (IMAGE_ROUTES, (*MODELS, NO_MODEL), STATUS_CLASSES)),
            (self.request_seconds, (IMAGE_ROUTES, (*MODELS, NO_MODEL), STATUS_CLASSES)),
            (self.upstream_seconds, (MODELS, (UpstreamOutcome.OK.value,))),
            (self.upstream_calls, (MODELS, _fixed(o.value for o in UpstreamOutcome))),
            (self.overhead_seconds, (IMAGE_ROUTES,)),
            (self.in_flight, (IMAGE_ROUTES,)),
            (self.images_billed, (MODELS, TEAMS)),
            (self.images_returned, (MODELS, TEAMS)),
            (self.spend_micros, (MODELS, TEAMS)),
            (self.uncertain_micros, (MODELS, TEAMS)),
            (self.rejections, (_fixed(r.value for r in Rejection),)),
            (self.holds_resolved, (HOLD_OUTCOMES,)),
            (self.store_errors, (STORE_OPERATIONS,)),
            (self.store_seconds, (STORE_OPERATIONS,)),
            (self.idempotent_replays, (REPLAY_KINDS,)),
            (self.budget_alerts, (BUDGET_ALERT_RESULTS,)),
        )  # fmt: skip
        self._learned: dict[Learned, set[str]] = {kind: set() for kind in Learned}
        self._create(None)

    def learn(self, models: Iterable[str] = (), teams: Iterable[str] = ()) -> None:
        """Create at 0 the label sets of models and teams not seen before."""
        for kind, values in ((Learned.MODELS, models), (Learned.TEAMS, teams)):
            new = set(values) - self._learned[kind]
            if new:
                self._learned[kind] |= new
                self._create(kind)

    def learn_team(self, team: str) -> None:
        """``learn`` for one team, cheap enough for every hold."""
        if team not in self._learned[Learned.TEAMS]:
            self.learn(teams=(team,))

    def _create(self, changed: Learned | None) -> None:
        """Create the preset label sets: all of them, or those that use ``changed``."""
        for family, labels in self.presets:
            if changed is not None and not any(changed in values for values in labels):
                continue
            for label_set in itertools.product(*(self._values(v) for v in labels)):
                family.labels(*label_set)

    def _values(self, values: LabelValues) -> Iterator[str]:
        for value in values:
            if isinstance(value, Learned):
                yield from sorted(self._learned[value])
            else:
                yield value

    def collector(self) -> CollectorRegistry:
        """What ``/metrics`` shows, aggregated across workers in multiprocess mode."""
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            return multiprocess_collector(directory, self.account)
        return _shown(InUsd(self.registry))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.collector()), CONTENT_TYPE_LATEST


# Families counted in micro-dollars, and the USD names they are shown under.
MICRO_USD: Final = {
    f"{PREFIX}_spend_micro_usd": f"{PREFIX}_spend_usd",
    f"{PREFIX}_uncertain_spend_micro_usd": f"{PREFIX}_uncertain_spend_usd",
}


class InUsd(Collector):
    """Another collector's families, those counted in micro-dollars shown in USD.

    Integer micro-dollars add up exactly; one division at the end gives the nearest
    double to the decimal amount, which the exposition prints in its shortest form.
    """

    def __init__(self, source: Collector) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            name = MICRO_USD.get(family.name)
            if name is None:
                yield family
                continue
            shown = Metric(name, family.documentation, family.type)
            for sample in family.samples:
                suffix = sample.name[len(family.name) :]
                shown.add_sample(name + suffix, sample.labels, sample.value / 1_000_000)
            yield shown


class AccountGauges(Collector):
    """The upstream account as last polled (``proxy/account.py``), in micro-USD.

    Each family is declared from the start, but has a sample only once a poll has read
    it: a balance never read is absent, never a 0 that would read as an empty account.
    Every process polls for itself and shows what it read (the account is the same for
    all of them), so these live outside the multiprocess files.
    """

    FAMILIES: Final = (
        ("balance", f"{PREFIX}_upstream_balance_usd",
         "The upstream account's quota minus its usage, in USD."),
        ("usage", f"{PREFIX}_upstream_usage_usd",
         "The upstream account's usage as the upstream reports it, in USD."),
        ("drift", f"{PREFIX}_upstream_drift_usd",
         "Upstream usage minus the ledger's spend since this process first read the "
         "account, in USD: positive when the upstream charged more than the ledger booked."),
    )  # fmt: skip

    def __init__(self) -> None:
        self.micros: dict[str, int] = {}

    def set(self, **micros: int) -> None:
        self.micros.update(micros)

    def collect(self) -> Iterator[Metric]:
        for field, name, documentation in self.FAMILIES:
            family = GaugeMetricFamily(name, documentation)
            if field in self.micros:
                family.add_metric([], self.micros[field] / 1_000_000)
            yield family


def multiprocess_collector(directory: str, *own: Collector) -> CollectorRegistry:
    """Every worker's metrics from ``directory``, with this process's ``own`` collectors,
    money in USD."""
    registry = CollectorRegistry()
    prom_multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    for collector in own:
        registry.register(collector)
    return _shown(InUsd(registry))


def _shown(collector: Collector) -> CollectorRegistry:
    """A registry of one collector, as the client library's HTTP server wants one."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


EXPORTED_NAMES: Final = (
    "apiyi_proxy_requests_total",
    "apiyi_proxy_request_duration_seconds",
    "apiyi_proxy_upstream_duration_seconds",
    "apiyi_proxy_upstream_calls_total",
    "apiyi_proxy_overhead_seconds",
    "apiyi_proxy_images_billed_total",
    "apiyi_proxy_images_returned_total",
    "apiyi_proxy_spend_usd_total",
    "apiyi_proxy_uncertain_spend_usd_total",
    "apiyi_proxy_rejections_total",
    "apiyi_proxy_in_flight_requests",
    "apiyi_proxy_holds_outstanding",
    "apiyi_proxy_holds_resolved_total",
    "apiyi_proxy_budget_remaining_usd",
    "apiyi_proxy_budget_limit_usd",
    "apiyi_proxy_top_key_spend_usd",
    "apiyi_proxy_store_errors_total",
    "apiyi_proxy_store_duration_seconds",
    "apiyi_proxy_idempotent_replays_total",
    "apiyi_proxy_settles_without_hold_total",
    "apiyi_proxy_key_change_subscription_losses_total",
    "apiyi_proxy_budget_alerts_total",
    "apiyi_proxy_request_log_dropped_total",
    "apiyi_proxy_upstream_balance_usd",
    "apiyi_proxy_upstream_usage_usd",
    "apiyi_proxy_upstream_drift_usd",
    "apiyi_proxy_upstream_account_poll_failures_total",
)
