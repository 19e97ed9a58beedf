"""A stateful model check of the ledger: money is never created, lost or paid twice.

Calls take holds, the upstream bills them or not, and each call is settled with what
its outcome costs (``money.charge``); replicas crash (their holds lapse after the
lease), the store loses its data, settles are sent twice, and a key with a zero
budget tries to spend. At every step, for the key and its team, in the day and the
month:

- limit = available + held + spent, held is the sum of open holds, spent the sum of
  what resolved holds kept, and uncertain never exceeds spent;
- the ledger is never below what the upstream billed (of the calls the store knows);
- no call is paid twice, and no key stays blocked once its holds' lease is over.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from typing import Any

import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from proxy.config import StoreSettings
from proxy.keys import KeyHasher, issue_key
from proxy.money import Outcome, Resolution, charge, resolution
from proxy.store import (
    HoldRequest,
    Limits,
    MemoryStore,
    Periods,
    Refusal,
    Settlement,
    Store,
    Team,
    group_of,
)
from proxy.store.redis import RedisStore

from .conftest import RedisServer

PERIODS = Periods("2026-11-23", "2026-11")
PRICE = 30_000
LEASE = 60.0


class LedgerMachine(RuleBasedStateMachine):
    holds = Bundle("holds")
    redis_url: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now = 1_000_000.0
        self.prefix = "m" + secrets.token_hex(4)
        self.store = self._open_store()
        self.team_limit = 7 * PRICE
        self.key_daily = 5 * PRICE
        self.key_monthly = 6 * PRICE
        _, self.key = issue_key(
            KeyHasher("p"),
            "k",
            team="team",
            limits=Limits(
                daily_micros=self.key_daily, monthly_micros=self.key_monthly, concurrency=4
            ),
        )
        _, self.broke = issue_key(KeyHasher("p"), "zero", limits=Limits(daily_micros=0))
        self._seed()
        self.open: dict[str, int] = {}
        self.requests: dict[str, HoldRequest] = {}
        self.lost: set[str] = set()  # open holds the store forgot (data loss)
        self.spent = 0
        self.uncertain = 0
        self.billed = 0  # what the upstream billed, of the calls the store knows

    def _open_store(self) -> Store:
        if self.redis_url is None:
            return MemoryStore(clock=lambda: self.now)
        return RedisStore.from_settings(StoreSettings(url=self.redis_url, key_prefix=self.prefix))

    def _seed(self) -> None:
        self.run(self.store.put_team(Team("team", Limits(self.team_limit, self.team_limit))))
        self.run(self.store.add_key(self.key))
        self.run(self.store.add_key(self.broke))

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()

    def _request(self, images: int) -> HoldRequest:
        hold_id = f"{secrets.token_hex(6)}@{group_of(self.key.id, 'team')}"
        return HoldRequest(
            hold_id, self.key.id, images * PRICE, PERIODS, LEASE, "gpt-image-2-vip", "team"
        )

    @rule(target=holds, images=st.integers(1, 3))
    def reserve(self, images: int) -> str:
        request = self._request(images)
        result = self.run(self.store.reserve(request))
        committed = sum(a for h, a in self.open.items() if h not in self.lost) + self.spent
        fits = committed + images * PRICE <= min(self.key_daily, self.key_monthly, self.team_limit)
        live = len(self.open) - len(self.lost)
        if result.ok:
            assert fits and live < 4
            self.open[request.hold_id] = images * PRICE
            self.requests[request.hold_id] = request
        else:
            assert not fits or live >= 4, result
        return request.hold_id

    @rule(
        hold_id=consumes(holds),
        outcome=st.sampled_from(list(Outcome)),
        maybe_billed=st.booleans(),
        twice=st.booleans(),
    )
    def call_ends(self, hold_id: str, outcome: Outcome, maybe_billed: bool, twice: bool) -> None:
        """The call's upstream outcome is settled; an uncertain one was billed or not."""
        if hold_id not in self.open:
            return  # refused at reserve, or resolved by a lapse already
        request = self.requests[hold_id]
        images = request.amount // PRICE
        cost = charge([outcome] * images, PRICE)
        kind = resolution(outcome)
        billed = cost.spent if kind is Resolution.SPENT else 0
        if kind is Resolution.UNCERTAIN and maybe_billed:
            billed = cost.spent
        settle = functools.partial(
            self.store.settle, hold_id, cost.spent, cost.uncertain, request=request
        )
        done = self.run(settle())
        amount = self.open.pop(hold_id)
        if hold_id in self.lost:
            self.lost.discard(hold_id)
            expected = Settlement.BOOKED_WITHOUT_HOLD if cost.spent else Settlement.NOTHING
            assert done is expected
        else:
            assert done is Settlement.SETTLED
        self.spent += min(cost.spent, amount)
        self.uncertain += min(cost.uncertain, amount)
        self.billed += billed
        if twice:  # a settle sent again (a retry of its write) changes nothing
            again = self.run(
                self.store.settle(hold_id, cost.spent, cost.uncertain, request=request)
            )
            assert again is Settlement.NOTHING
            assert not self.run(self.store.release(hold_id))

    @rule()
    def holds_are_renewed_while_their_calls_live(self) -> None:
        if self.redis_url is not None:
            return  # the Redis clock is real; renewal has its own contract test
        self.now += LEASE * 0.9
        known = [h for h in self.open if h not in self.lost]
        assert self.run(self.store.renew_holds(known, LEASE)) == len(known)
        assert self.run(self.store.expire_holds()) == 0

    @rule(billed=st.booleans())
    def replica_crashes_and_leases_lapse(self, billed: bool) -> None:
        if self.redis_url is not None:
            return  # the Redis clock is real; expiry has its own contract test
        self.now += LEASE + 1
        self.run(self.store.expire_holds())
        for hold_id, amount in self.open.items():
            if hold_id in self.lost:
                continue  # neither the store nor its replica knows this call any more
            self.spent += amount
            self.uncertain += amount
            self.billed += amount if billed else 0
        self.open.clear()
        self.lost.clear()
        # No key stays blocked after the lease: a one-image call is refused, if at all,
        # only by the budget.
        request = self._request(1)
        result = self.run(self.store.reserve(request))
        assert result.refusal is not Refusal.CONCURRENCY
        if result.ok:
            assert self.run(self.store.release(request.hold_id))

    @rule()
    def store_loses_its_data(self) -> None:
        if self.redis_url is None:
            self.store = MemoryStore(clock=lambda: self.now)
        else:
            client = redis.Redis.from_url(self.redis_url)
            client.flushdb()
            client.close()
        self._seed()
        self.lost = set(self.open)
        self.spent = self.uncertain = self.billed = 0

    @rule()
    def a_zero_budget_pays_for_nothing(self) -> None:
        request = HoldRequest(
            f"{secrets.token_hex(6)}@{group_of(self.broke.id, None)}",
            self.broke.id,
            PRICE,
            PERIODS,
            LEASE,
            "gpt-image-2-vip",
        )
        assert self.run(self.store.reserve(request)).refusal is Refusal.KEY_DAILY

    @invariant()
    def money_adds_up(self) -> None:
        held = sum(a for h, a in self.open.items() if h not in self.lost)
        for scope, name in (("key", self.key.id), ("team", "team")):
            for period in (PERIODS.day, PERIODS.month):
                tally = self.run(self.store.tally(scope, name, period))
                assert tally.held == held
                assert tally.spent == self.spent  # every call paid once, never twice
                assert tally.uncertain == self.uncertain <= tally.spent
                assert tally.spent >= self.billed  # never below what the upstream billed
                assert tally.limit is not None and tally.remaining is not None
                assert tally.limit == tally.remaining + tally.held + tally.spent or (
                    tally.remaining == 0 and tally.held + tally.spent >= tally.limit
                )
        broke = self.run(self.store.tally("key", self.broke.id, PERIODS.day))
        assert (broke.limit, broke.held, broke.spent) == (0, 0, 0)


MemoryLedger = LedgerMachine.TestCase
MemoryLedger.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)


def test_redis_ledger_model() -> None:
    server = RedisServer()
    try:
        machine = type("RedisLedger", (LedgerMachine,), {"redis_url": server.url})
        case = machine.TestCase
        case.settings = settings(max_examples=15, stateful_step_count=25, deadline=None)
        case("runTest").runTest()
    finally:
        server.stop()
