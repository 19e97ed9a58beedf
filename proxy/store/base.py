"""The store: keys, teams, the money ledger and idempotency records.

One abstract interface, backends chosen by URL scheme (``memory://``, ``redis://``…).
Every money step is one atomic operation on the store:

- ``reserve`` checks the key (exists, not revoked), rpm (GCRA on the store's clock),
  concurrency, and the key's and team's daily and monthly budgets, then records a
  ``Hold`` with a deadline — all or nothing.
- ``settle`` turns a hold into spend (``uncertain`` when the upstream may or may not
  have billed); ``release`` refunds it. Each acts once per hold id; later calls are no-ops.
- A hold is leased: its deadline is renewed by its replica while the call lives
  (``renew_holds``). A hold past its deadline (its replica died) becomes uncertain
  spend and frees its concurrency slot, so money never vanishes and a key is never
  blocked for longer than a lease; an idempotency claim linked to it becomes an
  uncertain outcome, so a duplicate gets 409 rather than paying again.
- A ``settle`` that finds no hold at all (the store restarted empty) still books the
  spend from the request it is given, and says so: nothing billed is forgotten.
- A ``settle`` or ``release`` of a hold id the store has not seen leaves a tombstone, and
  a ``reserve`` of a tombstoned id refuses. A reserve whose answer timed out may still
  reach the store later; the caller releases its id, and whichever lands first, no
  phantom hold survives.

Invariant, for every key and team and period: limit = available + held + spent.
Amounts are integer micro-dollars.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from ..limits import Limits
from .requests import RequestRecord

if TYPE_CHECKING:
    from .invalidation import Invalidations


@dataclass(frozen=True)
class KeyRecord:
    """A proxy-issued client key, as stored (the secret itself is never stored)."""

    id: str
    name: str
    key_hash: str
    last4: str
    created: int
    team: str | None = None
    limits: Limits = field(default_factory=Limits)
    models: tuple[str, ...] = ()
    revoked: bool = False

    @property
    def display(self) -> str:
        return f"sk-…{self.last4}"

    def public(self) -> dict[str, Any]:
        """What the admin API shows: never the hash, never the secret."""
        return {
            "id": self.id,
            "object": "proxy.key",
            "name": self.name,
            "team": self.team,
            "display": self.display,
            "created": self.created,
            "revoked": self.revoked,
            "models": list(self.models),
            "daily_usd": usd(self.limits.daily_micros),
            "monthly_usd": usd(self.limits.monthly_micros),
            "rpm": self.limits.rpm,
            "concurrency": self.limits.concurrency,
        }

    def with_changes(self, **changes: Any) -> KeyRecord:
        return replace(self, **changes)


@dataclass(frozen=True)
class Periods:
    """The budget periods a hold is counted in, named in the ledger's time zone."""

    day: str  # 2026-11-23
    month: str  # 2026-11


@dataclass(frozen=True)
class ClaimRequest:
    """An idempotency claim to link to a hold: taken in the same step if the scope is
    free, or, when ``owned``, already taken by this request. A linked claim lives as
    long as its hold; if the hold expires, the claim ends as an uncertain outcome,
    kept for ``keep_seconds``."""

    scope: str
    fingerprint: str
    ttl_seconds: float
    owner: str
    owned: bool = False
    keep_seconds: float = 0.0


@dataclass(frozen=True)
class HoldRequest:
    hold_id: str
    key_id: str
    amount: int
    periods: Periods
    ttl_seconds: float
    model: str
    team: str | None = None
    # An SDK first attempt claims its fingerprint here, so a retry can join it, at no
    # extra round trip; taken only with the hold, and only if nobody holds the scope.
    claim: ClaimRequest | None = None


class Settlement(enum.IntEnum):
    """What a ``settle`` did; false when it changed nothing."""

    NOTHING = 0  # already resolved, or a release of a hold never seen (tombstoned)
    SETTLED = 1
    BOOKED_WITHOUT_HOLD = 2  # the hold was gone (store lost its data): spend booked anyway


class Refusal(enum.Enum):
    """Why a reserve step refused; the value is the metrics reason."""

    UNKNOWN_KEY = "unknown_key"
    REVOKED = "revoked"
    RPM = "rpm"
    CONCURRENCY = "concurrency"
    ZERO_LIMIT = "zero_limit"  # the key's rpm or concurrency is 0: no call at all
    KEY_DAILY = "budget_key_daily"
    KEY_MONTHLY = "budget_key_monthly"
    TEAM_DAILY = "budget_team_daily"
    TEAM_MONTHLY = "budget_team_monthly"
    CANCELLED = "cancelled"  # the hold id was released before its reserve arrived

    @property
    def is_budget(self) -> bool:
        return self.value.startswith("budget_")


@dataclass(frozen=True)
class Reservation:
    """The answer of ``reserve``: a hold was taken, or the reason it was not."""

    refusal: Refusal | None = None
    retry_after: float | None = None
    # Team budget left after this hold, per period, for the metrics gauge.
    team_remaining: dict[str, int] | None = None
    claimed: bool = False  # the request's claim was taken with the hold

    @property
    def ok(self) -> bool:
        return self.refusal is None


@dataclass(frozen=True)
class Tally:
    """Money of one key or team in one period; ``limit`` None is no limit."""

    limit: int | None = None
    held: int = 0
    spent: int = 0
    uncertain: int = 0
    requests: int = 0

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.held - self.spent)

    def as_usd(self) -> dict[str, Any]:
        remaining = self.remaining
        return {
            "limit_usd": usd(self.limit),
            "held_usd": self.held / 1e6,
            "spent_usd": self.spent / 1e6,
            "uncertain_usd": self.uncertain / 1e6,
            "remaining_usd": None if remaining is None else remaining / 1e6,
            "requests": self.requests,
        }


PeriodKind = Literal["day", "month"]


@dataclass(frozen=True)
class Crossing:
    """A budget threshold reached for the first time in its period (``threshold`` a
    percentage of ``limit``); the store reports each one once, whoever asks."""

    scope: Literal["key", "team"]
    id: str  # the key id or the team name
    name: str  # the key's name or the team name
    kind: PeriodKind
    period: str  # 2026-11-23 or 2026-11, as the budget counts it
    threshold: str  # the percentage as configured, canonical ("50", "33.3")
    spent: int
    limit: int


# Threshold marks outlive their period (day or month) in any time zone, then go.
ALERT_MARK_SECONDS: dict[PeriodKind, int] = {"day": 2 * 86_400, "month": 35 * 86_400}


def threshold_text(percent: float) -> str:
    """A threshold as the store marks it: 50.0 -> "50", 33.3 -> "33.3"."""
    return f"{percent:g}"


def reached(spent: int, limit: int, threshold: str) -> bool:
    """Whether ``spent`` is at least ``threshold`` percent of a positive ``limit``.
    (``alert_thresholds.lua`` decides the same in the Redis store.)"""
    return spent * 100 >= limit * float(threshold)


class Spend(NamedTuple):
    """What one key, team or model spent in one period (history; no limit, no holds).
    A tuple: a report makes hundreds of thousands."""

    spent: int = 0
    uncertain: int = 0
    requests: int = 0


@dataclass(frozen=True)
class Team:
    name: str
    limits: Limits = field(default_factory=Limits)

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "object": "proxy.team",
            "daily_usd": usd(self.limits.daily_micros),
            "monthly_usd": usd(self.limits.monthly_micros),
        }


class IdemState(enum.Enum):
    NEW = "new"  # the caller owns the call now
    IN_FLIGHT = "in_flight"  # an identical call is running
    DONE = "done"  # an identical call finished; its result can be replayed
    MISMATCH = "mismatch"  # same key, different body


@dataclass(frozen=True)
class IdemRecord:
    state: IdemState
    # For DONE: the status and headers of the stored answer and where its body lives.
    status: int = 0
    result_id: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


# The status a finished call is recorded with when it may or may not have been billed.
UNCERTAIN_STATUS = 504
# An in-flight claim is leased for this many hold leases: it must outlive its hold's
# deadline until a sweep turns both into an uncertain outcome.
CLAIM_LEASES = 4


def usd(micros: int | None) -> float | None:
    """Micro-dollars as USD for display; None (no limit) stays None, 0 stays 0.0."""
    return None if micros is None else micros / 1e6


def group_of(key_id: str, team: str | None) -> str:
    """The hash-tag group of a key: its team's, or its own when it has none."""
    return f"t:{team}" if team else f"k:{key_id}"


def keys_by_group(keys: Iterable[KeyRecord]) -> dict[str, list[str]]:
    """Key ids by the group they are kept in, as ``Store.history`` takes names."""
    names: dict[str, list[str]] = {}
    for k in keys:
        names.setdefault(group_of(k.id, k.team), []).append(k.id)
    return names


def hold_group(ref: str) -> str:
    """The group encoded in a hold id or idempotency scope (``<random>@<group>``)."""
    return ref.partition("@")[2]


class StoreError(Exception):
    """The store could not be reached or answered wrongly; the caller fails closed.

    ``maybe_applied`` is False only when the step surely never reached the store (no
    connection, or refused before sending): nothing then needs undoing.
    """

    def __init__(self, message: str, *, maybe_applied: bool = True) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class Store(abc.ABC):
    """Keys, teams, ledger and idempotency records behind one interface."""

    # True for a store whose steps never wait on anything outside this process.
    in_process = False

    # keys --------------------------------------------------------------------
    @abc.abstractmethod
    async def add_key(self, record: KeyRecord) -> None: ...

    @abc.abstractmethod
    async def key_by_hash(self, key_hash: str) -> KeyRecord | None: ...

    @abc.abstractmethod
    async def key(self, key_id: str) -> KeyRecord | None: ...

    @abc.abstractmethod
    async def keys(self) -> list[KeyRecord]: ...

    @abc.abstractmethod
    async def update_key(self, key_id: str, **changes: Any) -> KeyRecord | None:
        """Change name, team, limits, models or revoked; None if there is no such key."""

    @abc.abstractmethod
    async def forget_key(self, key_id: str, periods: Periods, hold_ids: Sequence[str] = ()) -> bool:
        """Remove a key that cost nothing, with what it made: its record and hash index,
        its usage in ``periods`` (the caller names every period it can have used), its
        rate and concurrency state and its resolved holds ``hold_ids``. All or nothing:
        False while money is held or spent on it, and for a revoked key (the revocation
        must outlive it) or a key of a team (the team's tallies count its requests)."""

    # teams -------------------------------------------------------------------
    @abc.abstractmethod
    async def put_team(self, team: Team) -> None: ...

    @abc.abstractmethod
    async def seed_team(self, team: Team) -> bool:
        """Create ``team`` only if the store has no team of that name; True if it did.
        One atomic step, so a team changed meanwhile is never overwritten."""

    @abc.abstractmethod
    async def team(self, name: str) -> Team | None: ...

    @abc.abstractmethod
    async def teams(self) -> list[Team]: ...

    # ledger ------------------------------------------------------------------
    @abc.abstractmethod
    async def reserve(self, request: HoldRequest) -> Reservation: ...

    @abc.abstractmethod
    async def settle(
        self,
        hold_id: str,
        spent: int,
        uncertain: int = 0,
        *,
        request: HoldRequest | None = None,
    ) -> Settlement:
        """Turn the hold into ``spent`` (≤ the held amount), of which ``uncertain`` may
        or may not have been billed; the rest is refunded. If the store has never seen
        the hold and ``request`` is given, ``spent`` is booked from it all the same."""

    @abc.abstractmethod
    async def release(self, hold_id: str) -> bool:
        """Refund the hold; True if this call did it."""

    @abc.abstractmethod
    async def renew_holds(self, hold_ids: list[str], lease_seconds: float) -> int:
        """Move the deadlines of these open holds (and their linked claims) to
        ``lease_seconds`` from now; returns how many were still open."""

    async def mark_active(self, groups: list[str]) -> None:  # noqa: B027 - shared stores only
        """Note that these groups have open holds, so that every replica's sweep looks
        at them (and only groups so noted are swept)."""

    @abc.abstractmethod
    async def expire_holds(self) -> int:
        """Turn every hold past its deadline into uncertain spend; returns how many."""

    @abc.abstractmethod
    async def tally(self, scope: str, name: str, period: str) -> Tally:
        """Money of key ``name`` (scope "key") or team ``name`` (scope "team") in a period."""

    @abc.abstractmethod
    async def history(
        self, scope: str, names: Mapping[str, Sequence[str]], periods: Sequence[str]
    ) -> dict[tuple[str, str], Spend]:
        """Spend per (name, period) of ``scope`` ("key", "team" or "model"), for the
        (name, period) pairs with any; ``names`` lists them by the group they are kept
        in (``group_of``). A model is kept in every group it spent in, and its spend is
        the sum over the groups it is listed under."""

    @abc.abstractmethod
    async def holds_outstanding(self) -> int: ...

    @abc.abstractmethod
    async def cross_thresholds(
        self, request: HoldRequest, thresholds: Sequence[str]
    ) -> list[Crossing]:
        """Mark and return the ``thresholds`` (ascending percentages, see
        ``threshold_text``) that the spent money of the request's key and team has
        reached in its day and month and that no one marked before: one atomic step,
        so each crossing is reported once across every replica. Spent counts what was
        kept (uncertain included), not what is held. A budget with no limit, or a
        limit of 0, has no thresholds."""

    # idempotency -------------------------------------------------------------
    @abc.abstractmethod
    async def idem_begin(
        self,
        scope: str,
        fingerprint: str,
        ttl_seconds: float,
        *,
        owner: str = "",
        join_only: bool = False,
    ) -> IdemRecord:
        """Claim ``scope`` for ``owner``'s call with this body fingerprint, or report who
        has it. With ``join_only`` nothing is claimed: an absent record answers NEW.
        An owner that abandoned before its claim arrived claims nothing.
        """

    @abc.abstractmethod
    async def idem_finish(self, scope: str, record: IdemRecord, ttl_seconds: float) -> None: ...

    @abc.abstractmethod
    async def idem_consume(self, scope: str, result_id: str) -> None:
        """Forget a finished record whose answer (``result_id``) a replay delivered:
        an answer that reached its client is never joined again."""

    @abc.abstractmethod
    async def idem_abandon(self, scope: str, owner: str, ttl_seconds: float) -> None:
        """Forget ``owner``'s in-flight claim, whose call was never billed. If the claim
        has not arrived (it timed out on the way), mark the owner gone for ``ttl_seconds``
        so that it claims nothing when it does."""

    # the per-request log ---------------------------------------------------------
    @abc.abstractmethod
    async def append_requests(self, records: Sequence[RequestRecord]) -> None:
        """Add calls to the per-request log, which keeps about its cap, newest."""

    @abc.abstractmethod
    async def requests(
        self, key: str | None, team: str | None, limit: int, cursor: str | None
    ) -> tuple[list[RequestRecord], str | None]:
        """Up to ``limit`` records of key ``key`` and team ``team`` (None: any), newest
        first, older than ``cursor``, and the cursor of the next page: None once the log
        holds nothing older. A page may be short (see ``requests.Pager``). Raises
        ``BadCursor`` for a cursor it did not hand out."""

    def invalidations(self) -> Invalidations | None:
        """A subscription to the changes any process makes to key records, for this
        process's cache (see ``invalidation``); None for a store no other process
        writes, whose writers tell the cache themselves."""
        return None

    # life --------------------------------------------------------------------
    async def open(self) -> None:  # noqa: B027 - optional warm-up
        """Connect and load what the hot path needs, so the first requests pay nothing."""

    @abc.abstractmethod
    async def ping(self) -> None: ...

    async def close(self) -> None:  # noqa: B027 - optional for backends with nothing to close
        pass
