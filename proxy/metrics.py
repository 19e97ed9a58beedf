"""Prometheus metrics, bound to a registry handed in (SPEC section 8).

Labels are bounded: route templates (never raw paths), configured model names,
status classes (``2xx``), team names from the key records, fixed reason words.
No key, secret or request id is ever a label.

Under ``serve --workers N`` the CLI points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
directory before the workers start; ``/metrics`` then aggregates every worker's files.
"""

from __future__ import annotations

import os
from typing import Final, Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

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


class Metrics:
    """Every metric the proxy exports, created once per app."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        p = PREFIX
        self.requests = Labelled(
            Counter(
                f"{p}_requests",
                "Requests answered.",
                ["route", "model", "status_class"],
                registry=r,
            )
        )
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
            Counter(
                f"{p}_images_billed",
                "Images the upstream bills for.",
                ["model", "team"],
                registry=r,
            )
        )
        self.images_returned = Labelled(
            Counter(
                f"{p}_images_returned",
                "Images returned to clients.",
                ["model", "team"],
                registry=r,
            )
        )
        self.spend_usd = Labelled(
            Counter(
                f"{p}_spend_usd", "Money spent upstream, in USD.", ["model", "team"], registry=r
            )
        )
        self.uncertain_usd = Labelled(
            Counter(
                f"{p}_uncertain_spend_usd",
                "Spend kept because the upstream may have billed "
                "(timeouts, resets, expired holds).",
                ["model", "team"],
                registry=r,
            )
        )
        self.rejections = Labelled(
            Counter(
                f"{p}_rejections", "Requests the proxy refused, by reason.", ["reason"], registry=r
            )
        )
        self.in_flight = Labelled(
            Gauge(
                f"{p}_in_flight_requests",
                "Requests being served.",
                ["route"],
                registry=r,
                multiprocess_mode="livesum",
            )
        )
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
        self.store_errors = Labelled(
            Counter(f"{p}_store_errors", "Store calls that failed.", ["operation"], registry=r)
        )
        self.store_seconds = Labelled(
            Histogram(
                f"{p}_store_duration_seconds",
                "Store call latency.",
                ["operation"],
                buckets=STORE_BUCKETS,
                registry=r,
            )
        )
        # Unlabelled and created at start, so its first increase is seen by rate().
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
        self.idempotent_replays = Labelled(
            Counter(
                f"{p}_idempotent_replays",
                "Calls answered from an earlier identical call instead of paying again.",
                ["kind"],
                registry=r,
            )
        )

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition, aggregated across workers in multiprocess mode."""
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


EXPORTED_NAMES: Final = (
    "apiyi_proxy_requests_total",
    "apiyi_proxy_request_duration_seconds",
    "apiyi_proxy_upstream_duration_seconds",
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
    "apiyi_proxy_store_errors_total",
    "apiyi_proxy_store_duration_seconds",
    "apiyi_proxy_idempotent_replays_total",
    "apiyi_proxy_settles_without_hold_total",
    "apiyi_proxy_key_change_subscription_losses_total",
)
