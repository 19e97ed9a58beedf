"""``memory://``: the embedded store for one process, no setup.

Every method body runs without an ``await`` in the middle, so on one event loop each
step is atomic just as a Lua script is on Redis. The semantics mirror the Redis
backend's scripts; the same contract tests run against both.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..config import REQUEST_LOG_MAX_MEMORY
from ..limits import Limits
from .base import (
    CLAIM_LEASES,
    UNCERTAIN_STATUS,
    ClaimRequest,
    Crossing,
    HoldRequest,
    IdemRecord,
    IdemState,
    KeyRecord,
    PeriodKind,
    Periods,
    Refusal,
    Reservation,
    Settlement,
    Spend,
    Store,
    Tally,
    Team,
    reached,
)
from .requests import BadCursor, Pager, RequestRecord

# Resolved and released hold ids are remembered this long (at most this many), so a
# settle sent twice books once and a reserve arriving after its release takes nothing.
# Nothing waits on anything outside this process here, so an hour is ample.
FORGET_SECONDS = 3_600
FORGET_MOST = 1_000_000


@dataclass
class _Counter:
    held: int = 0
    spent: int = 0
    uncertain: int = 0
    requests: int = 0


@dataclass
class _Idem:
    until: float
    fingerprint: str
    owner: str
    record: IdemRecord


IN_FLIGHT = IdemRecord(IdemState.IN_FLIGHT)


@dataclass
class _Hold:
    request: HoldRequest
    deadline: float
    claim: ClaimRequest | None = None  # the idempotency claim that lives with it


class MemoryStore(Store):
    in_process = True

    def __init__(
        self, clock: Callable[[], float] = time.time, request_log_max: int = REQUEST_LOG_MAX_MEMORY
    ) -> None:
        self._clock = clock
        self._keys: dict[str, KeyRecord] = {}
        self._by_hash: dict[str, str] = {}
        self._teams: dict[str, Team] = {}
        self._ledger: defaultdict[tuple[str, str, str], _Counter] = defaultdict(_Counter)
        self._holds: dict[str, _Hold] = {}
        # Holds resolved, or released before their reserve arrived: id -> forget-after,
        # in the order they were added (so the oldest are forgotten first).
        self._ended: OrderedDict[str, float] = OrderedDict()
        self._tat: dict[str, float] = {}
        self._idem: dict[str, _Idem] = {}
        self._idem_gone: dict[tuple[str, str], float] = {}
        # Thresholds reported, per (scope, name, period), for the current periods.
        self._alerted: defaultdict[tuple[str, str, str], set[str]] = defaultdict(set)
        self._alert_periods = Periods("", "")
        # The per-request log, oldest first, each record with its number (its cursor).
        self._requests: deque[tuple[int, RequestRecord]] = deque(maxlen=request_log_max)
        self._request_numbers = itertools.count(1)

    # keys --------------------------------------------------------------------
    async def add_key(self, record: KeyRecord) -> None:
        self._keys[record.id] = record
        self._by_hash[record.key_hash] = record.id

    async def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        key_id = self._by_hash.get(key_hash)
        return None if key_id is None else self._keys.get(key_id)

    async def key(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    async def keys(self) -> list[KeyRecord]:
        return sorted(self._keys.values(), key=lambda k: (k.created, k.id))

    async def update_key(self, key_id: str, **changes: Any) -> KeyRecord | None:
        record = self._keys.get(key_id)
        if record is None:
            return None
        if "team" in changes and changes["team"] != record.team:
            raise ValueError("a key's team is fixed at creation")
        record = replace(record, **changes)
        self._keys[key_id] = record
        return record

    async def forget_key(self, key_id: str, periods: Periods, hold_ids: Sequence[str] = ()) -> bool:
        # Resolved holds are not kept here: ``hold_ids`` leave nothing to remove.
        record = self._keys.get(key_id)
        if record is None or record.revoked or record.team is not None:
            return False
        if any(hold.request.key_id == key_id for hold in self._holds.values()):
            return False
        usage = [("key", key_id, period) for period in (periods.day, periods.month)]
        for name in usage:
            counter = self._ledger.get(name)
            if counter is not None and (counter.held or counter.spent):
                return False
        del self._keys[key_id]
        self._by_hash.pop(record.key_hash, None)
        for name in usage:
            self._ledger.pop(name, None)
        self._tat.pop(key_id, None)
        return True

    # teams -------------------------------------------------------------------
    async def put_team(self, team: Team) -> None:
        self._teams[team.name] = team

    async def seed_team(self, team: Team) -> bool:
        if team.name in self._teams:
            return False
        self._teams[team.name] = team
        return True

    async def team(self, name: str) -> Team | None:
        return self._teams.get(name)

    async def teams(self) -> list[Team]:
        return sorted(self._teams.values(), key=lambda t: t.name)

    # ledger ------------------------------------------------------------------
    async def reserve(self, request: HoldRequest) -> Reservation:
        now = self._clock()
        self._expire(now)
        if request.hold_id in self._ended or request.hold_id in self._holds:
            return Reservation(Refusal.CANCELLED)
        key = self._keys.get(request.key_id)
        if key is None:
            return Reservation(Refusal.UNKNOWN_KEY)
        if key.revoked:
            return Reservation(Refusal.REVOKED)
        limits = key.limits
        team_limits = self._teams[key.team].limits if key.team in self._teams else Limits()
        p = request.periods
        levels = [
            ("key", key.id, p.day, limits.daily_micros, Refusal.KEY_DAILY),
            ("key", key.id, p.month, limits.monthly_micros, Refusal.KEY_MONTHLY),
        ]
        if key.team is not None:
            levels.append(("team", key.team, p.day, team_limits.daily_micros, Refusal.TEAM_DAILY))
            levels.append(
                ("team", key.team, p.month, team_limits.monthly_micros, Refusal.TEAM_MONTHLY)
            )
        for scope, name, period, limit, refusal in levels:
            c = self._ledger[(scope, name, period)]
            if limit is not None and c.held + c.spent + request.amount > limit:
                return Reservation(refusal)
        if 0 in (limits.concurrency, limits.rpm):
            return Reservation(Refusal.ZERO_LIMIT)  # no call at all, however long one waits
        if limits.concurrency is not None:
            active = sum(1 for h in self._holds.values() if h.request.key_id == key.id)
            if active >= limits.concurrency:
                return Reservation(Refusal.CONCURRENCY, retry_after=1.0)
        new_tat = None
        if limits.rpm is not None:
            new_tat, wait = _gcra(self._tat.get(key.id, 0.0), now, limits.rpm)
            if wait > 0:
                return Reservation(Refusal.RPM, retry_after=wait)
        # Every check passed: take the hold everywhere at once.
        if new_tat is not None:
            self._tat[key.id] = new_tat
        remaining: dict[str, int] = {}
        for scope, name, period, limit, _ in levels:
            c = self._ledger[(scope, name, period)]
            c.held += request.amount
            c.requests += 1
            if scope == "team" and limit is not None:
                remaining[period] = limit - c.held - c.spent
        for period in (p.day, p.month):
            self._ledger[("model", request.model, period)].requests += 1
        hold = _Hold(request, now + request.ttl_seconds)
        claimed = False
        if request.claim is not None:
            claimed = request.claim.owned or self._claim(request.claim, now)
            hold.claim = request.claim if claimed else None
        self._holds[request.hold_id] = hold
        return Reservation(team_remaining=remaining or None, claimed=claimed)

    async def settle(
        self,
        hold_id: str,
        spent: int,
        uncertain: int = 0,
        *,
        request: HoldRequest | None = None,
    ) -> Settlement:
        now = self._clock()
        hold = self._holds.pop(hold_id, None)
        if hold is None and hold_id in self._ended:
            return Settlement.NOTHING
        self._ended[hold_id] = now + FORGET_SECONDS
        known = hold.request if hold is not None else request
        if known is None:
            return Settlement.NOTHING  # a release of a hold never seen: a tombstone only
        spent, uncertain = _clamp(spent, uncertain, known.amount)
        if hold is not None:
            self._book(known, known.amount, spent, uncertain)
            return Settlement.SETTLED
        if not spent:
            return Settlement.NOTHING
        # Never seen: book what was billed from the request itself.
        self._book(known, 0, spent, uncertain, requests=1)
        return Settlement.BOOKED_WITHOUT_HOLD

    async def release(self, hold_id: str) -> bool:
        return bool(await self.settle(hold_id, 0))

    async def renew_holds(self, hold_ids: list[str], lease_seconds: float) -> int:
        now = self._clock()
        renewed = 0
        for hold_id in hold_ids:
            hold = self._holds.get(hold_id)
            if hold is None:
                continue
            hold.deadline = now + lease_seconds
            renewed += 1
            entry = self._linked_claim(hold, now)
            if entry is not None and entry.record is IN_FLIGHT:
                entry.until = max(entry.until, now + CLAIM_LEASES * lease_seconds)
        return renewed

    def _linked_claim(self, hold: _Hold, now: float) -> _Idem | None:
        """The hold's claim record, if it is still the one its owner took."""
        if hold.claim is None:
            return None
        entry = self._live_idem(hold.claim.scope, now)
        return entry if entry is not None and entry.owner == hold.claim.owner else None

    async def expire_holds(self) -> int:
        return self._expire(self._clock())

    def _expire(self, now: float) -> int:
        while self._ended:
            hold_id, until = next(iter(self._ended.items()))
            if until > now and len(self._ended) <= FORGET_MOST:
                break
            del self._ended[hold_id]
        expired = [hid for hid, h in self._holds.items() if h.deadline <= now]
        for hold_id in expired:
            hold = self._holds.pop(hold_id)
            amount = hold.request.amount
            self._book(hold.request, amount, amount, amount)
            self._ended[hold_id] = now + FORGET_SECONDS
            entry = self._linked_claim(hold, now)
            if hold.claim is not None and entry is not None and entry.record is IN_FLIGHT:
                # Its call may have been billed: a duplicate must not run it again.
                entry.record = IdemRecord(IdemState.DONE, UNCERTAIN_STATUS)
                entry.until = now + hold.claim.keep_seconds
        return len(expired)

    def _book(
        self, request: HoldRequest, held: int, spent: int, uncertain: int, requests: int = 0
    ) -> None:
        """Move ``held`` out of the hold column and book ``spent`` in every scope."""
        scopes = [("key", request.key_id)]
        if request.team is not None:
            scopes.append(("team", request.team))
        for scope, name in scopes:
            for period in (request.periods.day, request.periods.month):
                c = self._ledger[(scope, name, period)]
                c.held -= held
                c.spent += spent
                c.uncertain += uncertain
                c.requests += requests
        for period in (request.periods.day, request.periods.month):
            c = self._ledger[("model", request.model, period)]
            c.spent += spent
            c.uncertain += uncertain
            c.requests += requests

    async def tally(self, scope: str, name: str, period: str) -> Tally:
        c = self._ledger.get((scope, name, period), _Counter())
        limit = None
        daily = len(period) == 10
        if scope == "key" and name in self._keys:
            lim = self._keys[name].limits
            limit = lim.daily_micros if daily else lim.monthly_micros
        elif scope == "team" and name in self._teams:
            lim = self._teams[name].limits
            limit = lim.daily_micros if daily else lim.monthly_micros
        return Tally(limit, c.held, c.spent, c.uncertain, c.requests)

    async def history(
        self, scope: str, names: Mapping[str, Sequence[str]], periods: Sequence[str]
    ) -> dict[tuple[str, str], Spend]:
        wanted = {name for group_names in names.values() for name in group_names}
        found: dict[tuple[str, str], Spend] = {}
        for name in wanted:
            for period in periods:
                c = self._ledger.get((scope, name, period))
                if c is not None and (c.spent or c.requests):
                    found[(name, period)] = Spend(c.spent, c.uncertain, c.requests)
        return found

    async def holds_outstanding(self) -> int:
        return len(self._holds)

    async def cross_thresholds(
        self, request: HoldRequest, thresholds: Sequence[str]
    ) -> list[Crossing]:
        key = self._keys.get(request.key_id)
        if key is None:
            return []
        if request.periods != self._alert_periods:  # a new day: forget the old marks
            current = {request.periods.day, request.periods.month}
            for mark in [m for m in self._alerted if m[2] not in current]:
                del self._alerted[mark]
            self._alert_periods = request.periods
        levels: list[tuple[Literal["key", "team"], str, str, Limits]]
        levels = [("key", key.id, key.name, key.limits)]
        if key.team is not None and key.team in self._teams:
            levels.append(("team", key.team, key.team, self._teams[key.team].limits))
        crossings = []
        for scope, ident, name, limits in levels:
            kinds: tuple[tuple[PeriodKind, str, int | None], ...] = (
                ("day", request.periods.day, limits.daily_micros),
                ("month", request.periods.month, limits.monthly_micros),
            )
            for kind, period, limit in kinds:
                if not limit:
                    continue
                counter = self._ledger.get((scope, ident, period))
                spent = counter.spent if counter is not None else 0
                marks = self._alerted[(scope, ident, period)]
                for threshold in thresholds:
                    if not reached(spent, limit, threshold):
                        break
                    if threshold not in marks:
                        marks.add(threshold)
                        crossings.append(
                            Crossing(scope, ident, name, kind, period, threshold, spent, limit)
                        )
        return crossings

    # idempotency -------------------------------------------------------------
    async def idem_begin(
        self,
        scope: str,
        fingerprint: str,
        ttl_seconds: float,
        *,
        owner: str = "",
        join_only: bool = False,
    ) -> IdemRecord:
        now = self._clock()
        entry = self._live_idem(scope, now)
        if entry is None:
            if not join_only:
                self._claim(ClaimRequest(scope, fingerprint, ttl_seconds, owner), now)
            return IdemRecord(IdemState.NEW)
        if entry.fingerprint != fingerprint:
            return IdemRecord(IdemState.MISMATCH)
        return entry.record

    def _live_idem(self, scope: str, now: float) -> _Idem | None:
        entry = self._idem.get(scope)
        if entry is not None and entry.until <= now:
            del self._idem[scope]
            return None
        return entry

    def _claim(self, claim: ClaimRequest, now: float) -> bool:
        """Take a free scope for its owner, unless the owner already abandoned it."""
        if self._live_idem(claim.scope, now) is not None:
            return False
        gone = self._idem_gone.pop((claim.scope, claim.owner), None)
        if gone is not None and gone > now:
            return False
        self._idem[claim.scope] = _Idem(
            now + claim.ttl_seconds, claim.fingerprint, claim.owner, IN_FLIGHT
        )
        return True

    async def idem_finish(self, scope: str, record: IdemRecord, ttl_seconds: float) -> None:
        entry = self._idem.get(scope)
        fingerprint, owner = (entry.fingerprint, entry.owner) if entry else ("", "")
        self._idem[scope] = _Idem(self._clock() + ttl_seconds, fingerprint, owner, record)

    async def idem_consume(self, scope: str, result_id: str) -> None:
        entry = self._idem.get(scope)
        if entry is not None and entry.record.state is IdemState.DONE:
            if entry.record.result_id == result_id:
                del self._idem[scope]

    async def idem_abandon(self, scope: str, owner: str, ttl_seconds: float) -> None:
        entry = self._idem.get(scope)
        if entry is not None and entry.owner == owner:
            del self._idem[scope]
            return
        now = self._clock()
        for key in [k for k, until in self._idem_gone.items() if until <= now]:
            del self._idem_gone[key]
        self._idem_gone[(scope, owner)] = now + ttl_seconds

    # the per-request log ---------------------------------------------------------
    async def append_requests(self, records: Sequence[RequestRecord]) -> None:
        for record in records:
            self._requests.append((next(self._request_numbers), record))

    async def requests(
        self, key: str | None, team: str | None, limit: int, cursor: str | None
    ) -> tuple[list[RequestRecord], str | None]:
        log = self._requests
        skip = 0  # the newest records, not older than the cursor
        if cursor is not None:
            if not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 20):
                raise BadCursor(cursor)
            if log:
                skip = min(len(log), max(0, log[-1][0] - int(cursor) + 1))
        pager = Pager(key, team, limit)
        for number, record in itertools.islice(reversed(log), skip, None):
            if not pager.take(str(number), record):
                break
        return pager.page()

    async def ping(self) -> None:
        return None


def _clamp(spent: int, uncertain: int, amount: int) -> tuple[int, int]:
    """What a settle keeps of ``amount``: spent in 0..amount, uncertain in 0..spent."""
    spent = min(max(spent, 0), amount)
    return spent, min(max(uncertain, 0), spent)


def _gcra(tat: float, now: float, rpm: int) -> tuple[float, float]:
    """Generic cell rate: ``rpm`` per minute with a burst of ``rpm``.

    Returns the new theoretical arrival time and how long to wait (0 = allowed).
    Over any window of W seconds at most ``rpm + rpm * W / 60`` requests pass.
    """
    interval = 60.0 / rpm
    burst = 60.0 - interval
    tat = max(tat, now)
    wait = tat - burst - now
    if wait > 0:
        return tat, wait
    return tat + interval, 0.0
