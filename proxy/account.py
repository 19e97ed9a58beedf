"""The upstream account: its balance and usage, polled and reconciled with the ledger.

Where the upstream serves the account endpoints of its family (SPEC section 2), every
``upstream.account_poll_seconds`` the poller reads the quota
(``/dashboard/billing/subscription``) and the usage (``/dashboard/billing/usage``, in
0.01 USD) with the proxy's upstream key, and sets the account gauges: balance (quota
minus usage), usage, and drift. Drift is what the upstream charged beyond what the
ledger booked since this process first read the account, ``(U - U0) - (L - L0)``, where
``L`` is the spend of every key from that first poll's day on, read from the store that
every replica shares, so a call served by another replica is counted too. Between a
call's start (when the upstream bills it) and its settle, drift is briefly positive.

A 404 means the provider does not serve these endpoints: polling stops, with one log
line. Any other failure is counted, logged at most every ``FAILURE_LOG_SECONDS``, and
polling goes on. Only paths, status codes and kinds of failure are logged: never the
key, never the upstream's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import orjson

from .config import Settings
from .errors import ProxyError
from .ledger import Ledger
from .metrics import Metrics
from .store import keys_by_group
from .upstream import TransportError, UpstreamClient
from .usage import REPORT_TIMEOUT_SECONDS, days, months, next_month

log = logging.getLogger("apiyi_proxy.account")

SUBSCRIPTION = "/dashboard/billing/subscription"
USAGE = "/dashboard/billing/usage"
POLL_TIMEOUT_SECONDS = 30.0
# Start-up waits this long at most for the first poll, so that the first scrape already
# shows the account (and its series do not appear in the middle of a run).
FIRST_POLL_WAIT_SECONDS = 2.0
# The built-in fake upstream answers on the proxy's own port, which listens only once
# start-up is over: there the first poll comes this long after (at most one interval).
FAKE_FIRST_POLL_SECONDS = 1.0
FAILURE_LOG_SECONDS = 600.0
MAX_ANSWER_BYTES = 64 * 1024


class AccountUnavailable(Exception):
    """The upstream does not serve the account endpoints (it answered 404)."""


class PollFailed(Exception):
    """One poll failed; the message is safe to log (a path and a kind of failure)."""


@dataclass(frozen=True)
class Account:
    """The account as the upstream reports it, in micro-USD."""

    quota: int
    usage: int

    @property
    def balance(self) -> int:
        return self.quota - self.usage

    @classmethod
    def of(cls, subscription: dict[str, Any], usage: dict[str, Any]) -> Account:
        quota = _number(subscription, "hard_limit_usd", SUBSCRIPTION)
        used = _number(usage, "total_usage", USAGE)  # in 0.01 USD
        return cls(quota=round(quota * 1_000_000), usage=round(used * 10_000))


def _number(answer: dict[str, Any], name: str, path: str) -> float:
    value = answer.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PollFailed(f"{path}: no number {name} in the answer")
    return float(value)


async def ledger_spent_since(ledger: Ledger, first_day: str) -> int:
    """What the ledger booked as spent (uncertain spend included), in micro-USD, over
    every key from ``first_day`` to today, from the store all replicas share.

    Every spend is booked on its key, so the keys' tallies add up to all of it: the
    days of the window's first month, then whole months, one history read per poll.
    """
    store = ledger.store
    keys = await ledger.call("usage", store.keys, REPORT_TIMEOUT_SECONDS)
    names = keys_by_group(keys)
    periods = window_periods(first_day, ledger.periods().day)
    spent = await ledger.call(
        "usage", lambda: store.history("key", names, periods), REPORT_TIMEOUT_SECONDS
    )
    return sum(spend.spent for spend in spent.values())


def window_periods(first: str, last: str) -> list[str]:
    """The ledger periods covering ``first`` to ``last`` exactly once: the days left of
    the first month, then every later month whole (the current one is whole so far)."""
    start, end = date.fromisoformat(first), date.fromisoformat(last)
    after = next_month(start)
    return days(start, min(end, after - timedelta(days=1))) + months(after, end)


class AccountPoller:
    """Reads the upstream account every ``upstream.account_poll_seconds`` while the app
    runs, and sets the account gauges."""

    def __init__(
        self, settings: Settings, upstream: UpstreamClient, ledger: Ledger, metrics: Metrics
    ) -> None:
        self._every = settings.upstream.account_poll_seconds
        # Passthrough mode forwards each client's own key: the proxy has none to read with.
        self._passthrough = settings.auth.mode == "passthrough"
        self._key = None if self._passthrough else settings.upstream.api_key
        self._upstream = upstream
        self._ledger = ledger
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._first_delay = (
            min(self._every, FAKE_FIRST_POLL_SECONDS) if settings.server.fake_upstream else 0.0
        )
        # The reconciliation window: its first day, and U0 and L0 read then.
        self._first_day: str | None = None
        self._baseline = (0, 0)

    async def start(self) -> None:
        """Start polling, and wait for the first poll (a while at most)."""
        if self._every == 0:
            return
        if self._key is None:
            why = "in passthrough mode the proxy holds" if self._passthrough else "there is"
            log.info("upstream account not polled: %s no upstream key", why)
            return
        first = asyncio.Event()
        self._task = asyncio.create_task(self._poll_forever(first))
        if not self._first_delay:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FIRST_POLL_WAIT_SECONDS):
                    await first.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll_forever(self, first: asyncio.Event) -> None:
        await asyncio.sleep(self._first_delay)
        logged = -math.inf
        failing = False
        while True:
            try:
                await self.poll()
            except AccountUnavailable as unserved:
                log.info(
                    "upstream account not polled: the upstream does not serve %s (404)", unserved
                )
                first.set()
                return
            except Exception as error:  # a poll must never end the polling
                failure = error if isinstance(error, PollFailed) else type(error).__name__
                self._metrics.account_poll_failures.inc()
                failing = True
                if time.monotonic() - logged >= FAILURE_LOG_SECONDS:
                    logged = time.monotonic()
                    log.warning(
                        "upstream account poll failed: %s; polling goes on (logged at most "
                        "every %d s)",
                        failure,
                        FAILURE_LOG_SECONDS,
                    )
            else:
                if failing:
                    log.info("upstream account read again")
                    failing = False
            first.set()
            await asyncio.sleep(self._every)

    async def poll(self) -> None:
        """One reading of the account; raises ``AccountUnavailable`` or ``PollFailed``."""
        try:
            async with asyncio.timeout(POLL_TIMEOUT_SECONDS):
                subscription = await self._read(SUBSCRIPTION)
                usage = await self._read(USAGE)
        except TimeoutError:
            raise PollFailed(f"no answer within {POLL_TIMEOUT_SECONDS:.0f} s") from None
        account = Account.of(subscription, usage)
        self._metrics.account.set(balance=account.balance, usage=account.usage)
        first_day = self._first_day or self._ledger.periods().day
        try:
            spent = await ledger_spent_since(self._ledger, first_day)
        except ProxyError:
            return  # the store is away (counted and logged as such): drift waits
        if self._first_day is None:
            self._first_day, self._baseline = first_day, (account.usage, spent)
        usage0, spent0 = self._baseline
        self._metrics.account.set(drift=(account.usage - usage0) - (spent - spent0))

    async def _read(self, path: str) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {self._key}", "accept": "application/json"}
        try:
            response = await self._upstream.get(path, headers)
        except TransportError as error:
            raise PollFailed(f"{path}: {'timed out' if error.timeout else 'unreachable'}") from None
        try:
            if response.status == 404:
                raise AccountUnavailable(path)
            if response.status != 200:
                raise PollFailed(f"{path}: status {response.status}")
            body = await response.read(MAX_ANSWER_BYTES)
        except TransportError:
            raise PollFailed(f"{path}: connection lost") from None
        finally:
            await response.close()
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise PollFailed(f"{path}: not JSON") from None
        if not isinstance(answer, dict):
            raise PollFailed(f"{path}: not a JSON object")
        return answer
