"""Budget alert webhooks: each threshold of a budget, once per period, to every receiver.

After a settle that kept money (also one written late, once the store answered again)
the ledger tells ``Alerts.spent``, which never waits: the request's key is queued, and a
background task asks the store which thresholds the key and its team have newly reached
in the day and the month (``Store.cross_thresholds``, one atomic step that also marks
them, so that of all replicas exactly one reports each crossing). Each crossing goes
to every configured webhook in a task of its own: signed, retried with exponential
backoff after a connection failure, a timeout, a 5xx or a 429, and given up after
``alerts.max_attempts`` with one warning. No call waits on any of it.

The mark is taken before delivery: an alert given up, dropped past
``alerts.max_pending``, or under way when the process stops is not sent again. A key
queued but not yet checked when the process stops is checked at its next settle, on
any replica. Holds that expire as uncertain spend are counted at the next settle too.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import hmac
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from .config import AlertSettings, WebhookSettings, url_host
from .errors import ProxyError
from .ledger import Ledger
from .metrics import Metrics
from .store import Crossing, HoldRequest, Periods
from .store.base import threshold_text

log = logging.getLogger("apiyi_proxy.alerts")

SIGNATURE_HEADER = "x-apiyi-proxy-signature"
MAX_QUEUED_CHECKS = 10_000  # keys waiting for a check; each is checked again at its next settle
MAX_BACKOFF_SECONDS = 300.0
STORE_RETRY_SECONDS = 1.0
STOP_GRACE_SECONDS = 2.0


class Delivery(enum.Enum):
    """How an alert's delivery to one webhook ended; the value is the metrics label."""

    DELIVERED = "delivered"
    FAILED = "failed"  # every attempt failed, or the receiver refused it (a 4xx)
    DROPPED = "dropped"  # too many deliveries pending


class DeliveryError(Exception):
    """The webhook could not be reached, or did not answer in time."""


def payload(crossing: Crossing, now: datetime) -> dict[str, Any]:
    """The JSON body of a ``json`` webhook (SPEC section 10), ``period_start`` added."""
    threshold = float(crossing.threshold)
    return {
        "type": "budget.threshold",
        "scope": crossing.scope,
        "id": crossing.id,
        "name": crossing.name,
        "period": crossing.kind,
        "threshold": int(threshold) if threshold.is_integer() else threshold,
        "spent_usd": crossing.spent / 1e6,
        "limit_usd": crossing.limit / 1e6,
        "time": now.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "period_start": crossing.period if crossing.kind == "day" else crossing.period + "-01",
    }


def slack_text(crossing: Crossing) -> str:
    """One readable line: who, which budget, how far, spent of limit."""
    if crossing.scope == "key":
        who = f'Key "{crossing.name}" ({crossing.id})'
    else:
        who = f'Team "{crossing.name}"'
    budget = "daily" if crossing.kind == "day" else "monthly"
    return (
        f"apiyi-proxy: {who} reached {crossing.threshold}% of its {budget} budget "
        f"({crossing.period}): ${crossing.spent / 1e6:,.2f} spent of ${crossing.limit / 1e6:,.2f}."
    )


def body(hook: WebhookSettings, crossing: Crossing, now: datetime) -> bytes:
    if hook.format == "slack":
        return orjson.dumps({"text": slack_text(crossing)})
    return orjson.dumps(payload(crossing, now))


def signature(secret: str, data: bytes) -> str:
    """The signature header's value: an HMAC-SHA-256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


def retryable(status: int) -> bool:
    """A receiver's answer worth another attempt: it is failing or busy."""
    return status == 429 or status >= 500


async def post(
    session: aiohttp.ClientSession,
    url: str,
    data: bytes,
    headers: Mapping[str, str],
) -> int:
    """POST ``data`` to ``url``; the answer's status, or ``DeliveryError``. The
    session bounds the time an attempt takes."""
    try:
        async with session.post(url, data=data, headers=headers, allow_redirects=False) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise DeliveryError(type(exc).__name__) from exc


class Alerts:
    """Checks keys after their spend and delivers the thresholds they crossed."""

    def __init__(self, settings: AlertSettings, ledger: Ledger, metrics: Metrics) -> None:
        self._settings = settings
        self._hooks = settings.webhooks
        self._thresholds = tuple(threshold_text(t) for t in settings.thresholds)
        self._ledger = ledger
        self._metrics = metrics
        self._queued: dict[tuple[str, str | None, Periods], HoldRequest] = {}
        self._wake = asyncio.Event()
        self._deliveries: set[asyncio.Task[None]] = set()
        self._checker: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._hooks and self._thresholds)

    def spent(self, request: HoldRequest) -> None:
        """The request's hold kept money: check its key and team soon."""
        ref = (request.key_id, request.team, request.periods)
        if ref not in self._queued and len(self._queued) >= MAX_QUEUED_CHECKS:
            return  # checked at the key's next settle
        self._queued[ref] = request
        self._wake.set()

    def start(self) -> None:
        if not self.enabled:
            return
        self._session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"user-agent": "apiyi-proxy"},
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout_seconds),
        )
        self._checker = asyncio.create_task(self._check_forever())

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop checking; deliveries under way get ``grace`` seconds to finish."""
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
        if self._deliveries:
            _, late = await asyncio.wait(self._deliveries, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
                log.warning("%d budget alert deliveries cut short at shutdown", len(late))
        if self._session is not None:
            await self._session.close()

    # checks ----------------------------------------------------------------------------
    async def _check_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queued:
                ref, request = next(iter(self._queued.items()))
                del self._queued[ref]
                store = self._ledger.store
                check = functools.partial(store.cross_thresholds, request, self._thresholds)
                try:
                    crossings = await self._ledger.call("alerts", check)
                except ProxyError:
                    self._queued.setdefault(ref, request)  # the store is away: later
                    await asyncio.sleep(STORE_RETRY_SECONDS)
                    continue
                except Exception:  # a wrong answer must not end every later check
                    log.exception("budget alert check of key %s failed", request.key_id)
                    continue
                for crossing in crossings:
                    self._send(crossing)

    def _send(self, crossing: Crossing) -> None:
        session = self._session
        if session is None:
            return  # not started
        now = datetime.now(UTC)
        for hook in self._hooks:
            if len(self._deliveries) >= self._settings.max_pending:
                self._metrics.budget_alerts.labels(Delivery.DROPPED.value).inc()
                log.warning(
                    "budget alert for %s %s dropped: %d deliveries pending",
                    crossing.scope,
                    crossing.id,
                    len(self._deliveries),
                )
                continue
            data = body(hook, crossing, now)
            task = asyncio.create_task(self._deliver(session, hook, crossing, data))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    # delivery --------------------------------------------------------------------------
    async def _deliver(
        self,
        session: aiohttp.ClientSession,
        hook: WebhookSettings,
        crossing: Crossing,
        data: bytes,
    ) -> None:
        headers = {"content-type": "application/json"}
        if hook.secret:
            headers[SIGNATURE_HEADER] = signature(hook.secret, data)
        s = self._settings
        last = ""
        attempts = 0
        while attempts < s.max_attempts:
            if attempts:
                await asyncio.sleep(
                    min(s.backoff_seconds * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS)
                )
            attempts += 1
            try:
                status = await post(session, hook.url, data, headers)
            except DeliveryError as error:
                last = str(error)
                continue
            if 200 <= status < 300:
                self._metrics.budget_alerts.labels(Delivery.DELIVERED.value).inc()
                log.info(
                    "budget alert: %s %s reached %s%% of its %s budget; delivered to %s",
                    crossing.scope,
                    crossing.id,
                    crossing.threshold,
                    crossing.kind,
                    url_host(hook.url),
                )
                return
            last = f"status {status}"
            if not retryable(status):
                break
        self._metrics.budget_alerts.labels(Delivery.FAILED.value).inc()
        log.warning(
            "budget alert for %s %s (%s%% of its %s budget) to %s given up after %d "
            "attempts (last: %s)",
            crossing.scope,
            crossing.id,
            crossing.threshold,
            crossing.kind,
            url_host(hook.url),
            attempts,
            last,
        )
