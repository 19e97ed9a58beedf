"""A stateful model check of the ledger: money is never created, lost or resolved twice.

At every step, for the key and its team, in the day and the month:
limit = available + held + spent, held is the sum of open holds, spent the sum of
what resolved holds kept, and uncertain never exceeds spent.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from proxy.config import StoreSettings
from proxy.keys import KeyHasher, issue_key
from proxy.store import HoldRequest, Limits, MemoryStore, Periods, Store, Team, group_of
from proxy.store.redis import RedisStore

from .conftest import RedisServer

PERIODS = Periods("2026-11-23", "2026-11")
PRICE = 30_000


class LedgerMachine(RuleBasedStateMachine):
    holds = Bundle("holds")
    redis_url: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now = 1_000_000.0
        if self.redis_url is None:
            self.store: Store = MemoryStore(clock=lambda: self.now)
        else:
            self.store = RedisStore.from_settings(
                StoreSettings(url=self.redis_url, key_prefix="m" + secrets.token_hex(4))
            )
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
        self.run(self.store.put_team(Team("team", Limits(self.team_limit, self.team_limit))))
        self.run(self.store.add_key(self.key))
        self.open: dict[str, int] = {}
        self.spent = 0
        self.uncertain = 0

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()

    @rule(target=holds, images=st.integers(1, 3))
    def reserve(self, images: int) -> str:
        hold_id = f"{secrets.token_hex(6)}@{group_of(self.key.id, 'team')}"
        request = HoldRequest(
            hold_id, self.key.id, images * PRICE, PERIODS, 60.0, "gpt-image-2-vip", "team"
        )
        result = self.run(self.store.reserve(request))
        committed = sum(self.open.values()) + self.spent
        fits = committed + images * PRICE <= min(self.key_daily, self.key_monthly, self.team_limit)
        if result.ok:
            assert fits and len(self.open) < 4
            self.open[hold_id] = images * PRICE
        else:
            assert not fits or len(self.open) >= 4, result
        return hold_id

    @rule(hold_id=consumes(holds), kept=st.integers(0, 3), uncertain=st.integers(0, 3))
    def settle(self, hold_id: str, kept: int, uncertain: int) -> None:
        done = self.run(self.store.settle(hold_id, kept * PRICE, uncertain * PRICE))
        assert done == (hold_id in self.open)
        if done:
            amount = self.open.pop(hold_id)
            spent = min(kept * PRICE, amount)
            self.spent += spent
            self.uncertain += min(uncertain * PRICE, spent)
        # A hold resolves once: a second settle or release changes nothing.
        assert not self.run(self.store.settle(hold_id, PRICE))
        assert not self.run(self.store.release(hold_id))

    @rule()
    def replica_dies_and_deadlines_pass(self) -> None:
        if self.redis_url is not None:
            return  # the Redis clock is real; expiry has its own contract test
        self.now += 3600
        self.run(self.store.expire_holds())
        for amount in self.open.values():
            self.spent += amount
            self.uncertain += amount
        self.open.clear()

    @invariant()
    def money_adds_up(self) -> None:
        for scope, name in (("key", self.key.id), ("team", "team")):
            for period in (PERIODS.day, PERIODS.month):
                tally = self.run(self.store.tally(scope, name, period))
                assert tally.held == sum(self.open.values())
                assert tally.spent == self.spent
                assert tally.uncertain == self.uncertain <= tally.spent
                assert tally.limit > 0 and tally.remaining is not None
                assert tally.limit == tally.remaining + tally.held + tally.spent


MemoryLedger = LedgerMachine.TestCase
MemoryLedger.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_redis_ledger_model() -> None:
    server = RedisServer()
    try:
        machine = type("RedisLedger", (LedgerMachine,), {"redis_url": server.url})
        case = machine.TestCase
        case.settings = settings(max_examples=15, stateful_step_count=25, deadline=None)
        case("runTest").runTest()
    finally:
        server.stop()
