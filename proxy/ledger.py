"""Money on the request path: holds taken before the upstream call, resolved after.

``Ledger`` wraps the store with what the request path needs: a time bound on every
store call (a slow or dead store fails closed with 503 instead of hanging), metrics,
budget periods in the configured time zone, and a queue of resolutions the store has
not taken yet: a settle that could not be written, or the release of a reserve whose
answer never came (it may still land), is written when the store is back rather than
forgotten.

Holds are leased: this process renews the deadlines of its open holds (and their
concurrency slots and idempotency claims) every third of ``ledger.lease_seconds``
while their calls live, so a call never outlives its hold, and if the process dies
any replica's sweep turns its holds into uncertain spend within a lease and a sweep.
A settle that finds its hold gone (the store lost its data) books the spend anyway,
with a warning and a metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
import zoneinfo
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from .config import Settings
from .errors import BudgetExceeded, ProxyError, RateLimited, StoreUnavailable, Unauthorized
from .metrics import HOLD_EXPIRED, NO_TEAM, TOP_KEYS, Metrics, StoreOperation, StoreRefused
from .money import Charge
from .store import (
    ClaimRequest,
    HoldRequest,
    KeyRecord,
    MemoryStore,
    Periods,
    Refusal,
    Settlement,
    Store,
    StoreError,
    Team,
    group_of,
    hold_group,
    keys_by_group,
)

T = TypeVar("T")
log = logging.getLogger("apiyi_proxy.ledger")

SETTLE_RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
SWEEP_SECONDS = 5.0
BUDGET_REFRESH_SWEEPS = 6  # every 30 s
MAX_QUEUED_RELEASES = 100_000
FLUSH_BATCH = 64  # queued steps written at once, pipelined


class Hold:
    """Money reserved for one request; resolved exactly once."""

    __slots__ = ("_ledger", "claimed", "outcome", "request", "started", "store", "team")

    def __init__(
        self, ledger: Ledger, request: HoldRequest, team: str, store: Store | None = None
    ) -> None:
        self._ledger = ledger
        self.store = store or ledger.store
        self.request = request
        self.team = team  # as the metrics name it ("none" for a key without one)
        self.started = time.monotonic()
        self.outcome: str | None = None
        self.claimed = False  # the idempotency claim asked for was taken with the hold

    @property
    def id(self) -> str:
        return self.request.hold_id

    @property
    def amount(self) -> int:
        return self.request.amount

    async def settle(self, charge: Charge) -> None:
        """Keep what ``charge`` says of the hold (never more than its amount)."""
        if self.outcome is None:
            self.outcome = charge.resolution.value
            await self._ledger.resolve(self, charge)


class Ledger:
    def __init__(self, store: Store, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self._settings = settings
        self._metrics = metrics
        self._timeout = settings.store.timeout_seconds
        self._zone = zoneinfo.ZoneInfo(settings.ledger.timezone)
        self.lease = settings.ledger.lease_seconds
        # The longest a call can live: past it a hold is no longer renewed.
        self.max_call_seconds = (
            settings.upstream.total_timeout_seconds
            + settings.upstream.connect_timeout
            + settings.ledger.hold_grace_seconds
        )
        self._open: dict[str, Hold] = {}  # this process's open holds, renewed
        # Steps decided but not yet written (settles, releases, abandoned claims) by
        # what they act on, with the store operation they count as.
        self._unwritten: dict[str, tuple[StoreOperation, Callable[[], Awaitable[object]]]] = {}
        self._wake = asyncio.Event()
        self._store_back = asyncio.Event()
        self._fallback = MemoryStore() if settings.store.on_error == "open" else None
        self._tasks: list[asyncio.Task[None]] = []
        self._periods_second = -1
        self._ids = random.Random()  # hold ids need to be unique, not unpredictable
        self._periods = Periods("", "")
        # The config file's teams: created in the store when absent, never overwritten.
        self._seeds = {
            name: Team(name, limits) for name, limits in settings.ledger.team_seeds().items()
        }
        self._keys_seen = False  # the store's keys are read once, for their teams' metrics
        # Told of every settle the store took that kept money (budget alerts); never waits.
        self.on_spend: Callable[[HoldRequest], None] | None = None
        self._top_keys: set[tuple[str, str, str]] = set()  # label sets of the top keys shown
        metrics.learn(models=(m.name for m in settings.policy.models), teams=self._seeds)

    # store calls ---------------------------------------------------------------------
    async def call(
        self,
        operation: StoreOperation,
        step: Callable[[], Awaitable[T]],
        seconds: float | None = None,
    ) -> T:
        """Run one store step within the store timeout (or ``seconds``, for a report
        off the request path); failures become 503."""
        started = time.perf_counter()
        try:
            if self.store.in_process:
                result = await step()  # nothing to wait for: no timer needed
            else:
                async with asyncio.timeout(seconds or self._timeout):
                    result = await step()
        except (StoreError, TimeoutError, OSError) as exc:
            self._metrics.store_errors.labels(operation).inc()
            log.warning("store %s failed: %s", operation, type(exc).__name__)
            error = StoreUnavailable(
                "The proxy's budget store is unavailable; try again shortly.", retry_after=2
            )
            error.maybe_applied = getattr(exc, "maybe_applied", True)
            raise error from exc
        finally:
            self._metrics.store_seconds.labels(operation).observe(time.perf_counter() - started)
        if self._unwritten:
            self._store_back.set()
        return result

    def periods(self, now: float | None = None) -> Periods:
        now = time.time() if now is None else now
        second = int(now)
        if second != self._periods_second:  # the same answer all through one second
            moment = datetime.fromtimestamp(second, self._zone)
            self._periods = Periods(day=moment.strftime("%Y-%m-%d"), month=moment.strftime("%Y-%m"))
            self._periods_second = second
        return self._periods

    # holds ---------------------------------------------------------------------------
    async def hold(
        self, key: KeyRecord, model: str, amount: int, claim: ClaimRequest | None = None
    ) -> Hold:
        """Reserve ``amount`` for ``key`` (and take ``claim`` if it is free) or raise the
        refusal as an error."""
        request = HoldRequest(
            hold_id=f"{self._ids.getrandbits(96):024x}@{group_of(key.id, key.team)}",
            key_id=key.id,
            amount=amount,
            periods=self.periods(),
            ttl_seconds=self.lease,
            model=model,
            team=key.team,
            claim=claim,
        )
        team = key.team or NO_TEAM
        self._metrics.learn_team(team)  # at 0 before its first spend
        store = self.store
        try:
            reservation = await self.call("reserve", lambda: store.reserve(request))
        except StoreUnavailable as error:
            # The reserve may still reach the store after we stopped waiting for it:
            # release its id until that is written, so no phantom hold is left behind.
            if error.maybe_applied:
                self.write_later(
                    request.hold_id, "settle", functools.partial(store.release, request.hold_id)
                )
            if claim is not None and error.maybe_applied:
                abandon = functools.partial(
                    store.idem_abandon, claim.scope, claim.owner, claim.ttl_seconds
                )
                self.write_later(f"idem:{claim.scope}:{claim.owner}", "idempotency", abandon)
            if self._fallback is None:
                raise
            # store.on_error: open — limits of this process only, budgets counted locally.
            store = self._fallback
            await store.add_key(key)
            reservation = await store.reserve(request)
        if reservation.refusal is not None:
            refusal = reservation.refusal
            raise _refusal_error(refusal, reservation.retry_after) from StoreRefused(refusal)
        if reservation.team_remaining:
            for period, remaining in reservation.team_remaining.items():
                kind = "day" if len(period) == 10 else "month"
                self._metrics.budget_remaining_usd.labels(team, kind).set(remaining / 1e6)
        self._metrics.holds_outstanding.inc()
        hold = Hold(self, request, team, store)
        hold.claimed = reservation.claimed
        self._open[hold.id] = hold
        return hold

    async def resolve(self, hold: Hold, charge: Charge) -> None:
        self._open.pop(hold.id, None)
        self._metrics.holds_outstanding.dec()
        spent, uncertain = charge.spent, charge.uncertain
        model, outcome = hold.request.model, charge.resolution.value
        if spent:
            self._metrics.spend_micros.labels(model, hold.team).inc(spent)
        if uncertain:
            self._metrics.uncertain_micros.labels(model, hold.team).inc(uncertain)
        if hold.store is not self.store:
            await hold.store.settle(hold.id, spent, uncertain)
            self._metrics.holds_resolved.labels(outcome).inc()
            return
        step = functools.partial(self._settle, hold.request, spent, uncertain, outcome)
        try:
            await self.call("settle", step)
        except ProxyError:
            # The answer is already decided; the ledger must still learn it.
            self.write_later(hold.id, "settle", step, droppable=False)

    async def _settle(self, request: HoldRequest, spent: int, uncertain: int, outcome: str) -> None:
        done = await self.store.settle(request.hold_id, spent, uncertain, request=request)
        if done is not Settlement.NOTHING:
            # Counted as the store took it: a hold that lapsed first was counted by the
            # sweep that expired it.
            self._metrics.holds_resolved.labels(outcome).inc()
        if spent and self.on_spend is not None:
            # Also when this write found the hold resolved: an earlier attempt that
            # timed out may have landed, and a check twice reports nothing twice.
            self.on_spend(request)
        if done is Settlement.BOOKED_WITHOUT_HOLD:
            self._metrics.settles_without_hold.inc()
            log.warning(
                "settle found no hold %s (the store lost its data?): booked %d micro-USD "
                "for key %s from the request",
                request.hold_id,
                spent,
                request.key_id,
            )

    # resolutions the store has not taken yet -------------------------------------------
    def write_later(
        self,
        ref: str,
        operation: StoreOperation,
        step: Callable[[], Awaitable[object]],
        *,
        droppable: bool = True,
    ) -> None:
        """Write ``step`` once the store answers again (it must be idempotent).

        A droppable step only undoes something that may have landed (a release of a
        reserve that timed out); past the cap, in a long outage, it is dropped and its
        hold expires as uncertain spend, never a loss. Settles are never dropped.
        """
        if droppable and len(self._unwritten) >= MAX_QUEUED_RELEASES:
            return
        self._unwritten[ref] = (operation, step)
        self._wake.set()

    async def _write_unwritten(self) -> None:
        """Write queued steps, backing off while the store is away."""
        attempt = 0
        while True:
            if not self._unwritten:
                self._wake.clear()
                await self._wake.wait()
            if await self._flush():
                attempt = 0
                continue
            # Back off, but come back at once when another store call succeeds.
            self._store_back.clear()
            delay = SETTLE_RETRY_SECONDS[min(attempt, len(SETTLE_RETRY_SECONDS) - 1)]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._store_back.wait(), delay)
            attempt += 1

    async def _flush(self) -> bool:
        """Write what is queued, a batch at a time, until the store fails; True if all was."""
        queued = list(self._unwritten.items())
        for start in range(0, len(queued), FLUSH_BATCH):
            batch = queued[start : start + FLUSH_BATCH]
            results = await asyncio.gather(
                *(self.call(operation, step) for _, (operation, step) in batch),
                return_exceptions=True,
            )
            for (ref, _), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException) and not isinstance(result, ProxyError):
                    raise result
                if not isinstance(result, BaseException):
                    self._unwritten.pop(ref, None)
            if any(isinstance(result, ProxyError) for result in results):
                return False
        return True

    # background ----------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._sweep_forever()),
            asyncio.create_task(self._write_unwritten()),
            asyncio.create_task(self._renew_forever()),
        ]

    # leases --------------------------------------------------------------------------
    async def _renew_forever(self) -> None:
        """Renew this process's open holds every third of a lease."""
        while True:
            await asyncio.sleep(self.lease / 3)
            with contextlib.suppress(ProxyError):
                await self.renew()

    async def renew(self) -> None:
        """One renewal of every open hold this process may still renew, and a note
        that their groups are active, so that any replica's sweep finds them."""
        now = time.monotonic()
        live = [h for h in self._open.values() if now - h.started < self.max_call_seconds]
        if self._fallback is not None:  # holds taken while the store was away live there
            local = [h.id for h in live if h.store is self._fallback]
            await self._fallback.renew_holds(local, self.lease)
        shared = [h.id for h in live if h.store is self.store]
        if not shared:
            return
        groups = sorted({hold_group(hold_id) for hold_id in shared})
        await self.call("renew", lambda: self.store.mark_active(groups))
        await self.call("renew", lambda: self.store.renew_holds(shared, self.lease))

    async def _sweep_forever(self) -> None:
        sweeps = 0
        while True:
            if sweeps % BUDGET_REFRESH_SWEEPS == 0:
                with contextlib.suppress(ProxyError):
                    await self.refresh_budgets()
            await asyncio.sleep(SWEEP_SECONDS)
            sweeps += 1
            with contextlib.suppress(ProxyError):
                expired = await self.call("expire", self.store.expire_holds)
                if expired:
                    self._metrics.holds_resolved.labels(HOLD_EXPIRED).inc(expired)

    async def seed_teams(self) -> None:
        """Create the config file's teams the store lacks: at start-up, and again after
        the store lost its data. A team changed through the admin API is left alone."""
        for name in self._seeds:
            await self.seed_team(name)

    async def seed_team(self, name: str) -> None:
        team = self._seeds.get(name)
        if team is None:
            return
        if await self.call("teams", functools.partial(self.store.seed_team, team)):
            log.info("team %s created from the config file", name)

    async def refresh_budgets(self) -> None:
        """Re-seed the config file's teams, then set the team budget gauges from the
        store: a quiet team's gauge must not keep yesterday's value, and a new period
        starts full. Teams (and, the first time, the teams of keys) get their metrics."""
        await self.seed_teams()
        if not self._keys_seen:
            keys = await self.call("key", self.store.keys)
            self._metrics.learn(teams=(k.team for k in keys if k.team))
            self._keys_seen = True
        periods = self.periods()
        teams = await self.call("teams", self.store.teams)
        self._metrics.learn(teams=(team.name for team in teams))
        for team in teams:
            for kind, period in (("day", periods.day), ("month", periods.month)):
                tally = await self.call(
                    "tally", functools.partial(self.store.tally, "team", team.name, period)
                )
                if tally.limit is not None:
                    remaining = tally.remaining or 0
                    self._metrics.budget_remaining_usd.labels(team.name, kind).set(remaining / 1e6)
                    self._metrics.budget_limit_usd.labels(team.name, kind).set(tally.limit / 1e6)
        await self.refresh_top_keys(periods)

    async def refresh_top_keys(self, periods: Periods) -> None:
        """Set the top-spending keys' gauge from the store (every replica shows the
        same), and drop the keys that left the top."""
        keys = await self.call("key", self.store.keys)
        names = keys_by_group(keys)
        spent = await self.call(
            "usage", lambda: self.store.history("key", names, [periods.day, periods.month])
        )
        by_id = {k.id: k.name for k in keys}
        shown: set[tuple[str, str, str]] = set()
        for kind, period in (("day", periods.day), ("month", periods.month)):
            cells = [(s.spent, key_id) for (key_id, p), s in spent.items() if p == period]
            for amount, key_id in sorted(cells, reverse=True)[:TOP_KEYS]:
                if amount > 0:
                    shown.add((key_id, by_id[key_id], kind))
                    gauge = self._metrics.top_key_spend_usd.labels(key_id, by_id[key_id], kind)
                    gauge.set(amount / 1e6)
        for gone in self._top_keys - shown:
            with contextlib.suppress(KeyError):
                self._metrics.top_key_spend_usd.remove(*gone)
        self._top_keys = shown

    async def stop(self, grace: float = 5.0) -> None:
        """Give queued settles a last chance to land, then stop the background work."""
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._flush()
        if self._unwritten:
            log.warning("%d store steps not written; their holds expire", len(self._unwritten))

    @property
    def pending_settles(self) -> int:
        return len(self._unwritten)


def _refusal_error(refusal: Refusal, retry_after: float | None) -> ProxyError:
    if refusal is Refusal.CANCELLED:
        return StoreUnavailable("The proxy's budget store answered late; try again.", retry_after=1)
    if refusal in (Refusal.UNKNOWN_KEY, Refusal.REVOKED):
        return Unauthorized("Incorrect API key provided.")
    if refusal.is_budget:
        scope = "team" if "team" in refusal.value else "key"
        period = "daily" if "daily" in refusal.value else "monthly"
        return BudgetExceeded(
            f"The {period} budget of this {scope} is spent; it renews at the next period.",
        )
    if refusal is Refusal.ZERO_LIMIT:
        error = RateLimited(
            "This key's rpm or concurrency limit is 0: it may make no calls.", retry_after=60.0
        )
        error.should_retry = False  # waiting does not help
        return error
    if refusal is Refusal.RPM:
        return RateLimited(
            "Rate limit reached for this key (requests per minute).", retry_after=retry_after or 1.0
        )
    return RateLimited("Too many concurrent requests for this key.", retry_after=retry_after or 1.0)
