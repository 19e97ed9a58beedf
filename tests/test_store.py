"""The store contract: the same tests against every backend (memory, real Redis)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace

import pytest
from redis.asyncio.cluster import RedisCluster

from proxy.config import StoreSettings
from proxy.keys import KeyHasher, issue_key
from proxy.redis_url import RedisTarget
from proxy.store import (
    ClaimRequest,
    HoldRequest,
    IdemRecord,
    IdemState,
    KeyRecord,
    Limits,
    MemoryStore,
    Periods,
    Refusal,
    Settlement,
    Store,
    StoreError,
    Team,
    group_of,
)
from proxy.store.redis import RedisStore
from proxy.store.redis_client import connect
from proxy.store.resp import MultiplexedConnection

from .conftest import RedisServer, free_port

PERIODS = Periods("2026-11-23", "2026-11")
PRICE = 30_000
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def redis_for_store() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


_counter = iter(range(1_000_000))


SERVERS = {"redis": "redis_for_store", "redis-cluster": "redis_cluster",
           "redis-sentinel": "redis_sentinel"}  # fmt: skip


@pytest.fixture(params=["memory", *SERVERS])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        backend: Store = MemoryStore()
    else:
        server = request.getfixturevalue(SERVERS[request.param])
        settings = StoreSettings(url=server.url, key_prefix=f"t{next(_counter)}")
        backend = RedisStore.from_settings(settings)
    yield backend
    await backend.close()


def new_key(team: str | None = None, **limits: int) -> KeyRecord:
    _, record = issue_key(KeyHasher("pepper"), "k", team=team, limits=Limits(**limits))
    return record


def hold(key: KeyRecord, amount: int = PRICE, ttl: float = 60.0) -> HoldRequest:
    import secrets

    return HoldRequest(
        hold_id=f"{secrets.token_hex(6)}@{group_of(key.id, key.team)}",
        key_id=key.id,
        amount=amount,
        periods=PERIODS,
        ttl_seconds=ttl,
        model="gpt-image-2-vip",
        team=key.team,
    )


async def test_keys_roundtrip(store: Store) -> None:
    key = new_key(team="design", daily_micros=90_000, rpm=5)
    await store.add_key(key)
    assert await store.key_by_hash(key.key_hash) == key
    assert await store.key(key.id) == key
    assert await store.key_by_hash("0" * 64) is None
    assert [k.id for k in await store.keys()] == [key.id]
    updated = await store.update_key(key.id, revoked=True, name="renamed")
    assert updated is not None and updated.revoked and updated.name == "renamed"
    assert (await store.key(key.id)) == updated
    assert await store.update_key("key_missing", revoked=True) is None
    with pytest.raises(ValueError):
        await store.update_key(key.id, team="other")


async def stored_names(store: Store) -> list[str]:
    """Every Redis key under the store's prefix (a memory store has none)."""
    if not isinstance(store, RedisStore):
        return []
    if isinstance(store.r, RedisCluster):
        names = await store.r.keys(f"{store.p}:*", target_nodes=RedisCluster.PRIMARIES)
    else:
        names = await store.r.keys(f"{store.p}:*")
    return sorted(names)


async def test_forget_key_removes_a_key_that_cost_nothing(store: Store) -> None:
    before = await stored_names(store)
    key = new_key(rpm=60, concurrency=2, daily_micros=PRICE * 10)
    await store.add_key(key)
    holds = [hold(key), hold(key)]
    for h in holds:
        assert (await store.reserve(h)).ok
        await store.release(h.hold_id)
    assert await store.forget_key(key.id, PERIODS, [h.hold_id for h in holds])
    assert await store.key_by_hash(key.key_hash) is None
    assert await store.key(key.id) is None
    assert await store.keys() == []
    assert await stored_names(store) == before
    assert (await store.tally("key", key.id, PERIODS.day)).requests == 0
    assert (await store.reserve(hold(key))).refusal is Refusal.UNKNOWN_KEY
    assert not await store.forget_key(key.id, PERIODS)
    # Seen again, it starts afresh.
    await store.add_key(key)
    assert (await store.reserve(hold(key))).ok


async def test_forget_key_keeps_a_key_with_money_on_it(store: Store) -> None:
    key = new_key(concurrency=2)
    await store.add_key(key)
    held = hold(key)
    assert (await store.reserve(held)).ok
    assert not await store.forget_key(key.id, PERIODS, [held.hold_id])
    await store.settle(held.hold_id, PRICE, PRICE)
    assert not await store.forget_key(key.id, PERIODS, [held.hold_id])
    assert await store.key_by_hash(key.key_hash) == key
    tally = await store.tally("key", key.id, PERIODS.day)
    assert (tally.spent, tally.uncertain, tally.requests) == (PRICE, PRICE, 1)
    assert (await store.reserve(hold(key))).ok


async def test_forget_key_keeps_revoked_and_team_keys(store: Store) -> None:
    revoked, in_team = new_key(), new_key(team="design")
    for key in (revoked, in_team):
        await store.add_key(key)
    await store.update_key(revoked.id, revoked=True)
    for key in (revoked, in_team):
        assert not await store.forget_key(key.id, PERIODS)
        assert await store.key_by_hash(key.key_hash) is not None
    assert (await store.reserve(hold(revoked))).refusal is Refusal.REVOKED
    assert not await store.forget_key("key_missing", PERIODS)


async def test_teams_roundtrip(store: Store) -> None:
    await store.put_team(Team("design", Limits(1_000_000, 20_000_000)))
    team = await store.team("design")
    assert team is not None and team.limits.daily_micros == 1_000_000
    assert [t.name for t in await store.teams()] == ["design"]
    assert await store.team("nobody") is None


async def test_hold_settle_release_once(store: Store) -> None:
    key = new_key(daily_micros=100_000)
    await store.add_key(key)
    first, second = hold(key), hold(key)
    assert (await store.reserve(first)).ok
    assert (await store.reserve(second)).ok
    tally = await store.tally("key", key.id, PERIODS.day)
    assert (tally.held, tally.spent, tally.limit) == (2 * PRICE, 0, 100_000)
    assert await store.settle(first.hold_id, PRICE)
    assert not await store.settle(first.hold_id, PRICE)
    assert await store.release(second.hold_id)
    assert not await store.release(second.hold_id)
    tally = await store.tally("key", key.id, PERIODS.day)
    assert (tally.held, tally.spent, tally.uncertain, tally.requests) == (0, PRICE, 0, 2)
    month = await store.tally("key", key.id, PERIODS.month)
    assert month.spent == PRICE


async def test_release_before_reserve_leaves_no_hold(store: Store) -> None:
    # A reserve whose answer timed out may reach the store after the caller released it.
    key = new_key(daily_micros=100_000, concurrency=1)
    await store.add_key(key)
    late = hold(key)
    assert not await store.release(late.hold_id)
    refused = await store.reserve(late)
    assert refused.refusal is Refusal.CANCELLED
    tally = await store.tally("key", key.id, PERIODS.day)
    assert (tally.held, tally.spent, tally.requests) == (0, 0, 0)
    assert await store.holds_outstanding() == 0
    assert (await store.reserve(hold(key))).ok  # the concurrency slot is free


async def test_same_hold_id_is_never_reserved_twice(store: Store) -> None:
    key = new_key()
    await store.add_key(key)
    request = hold(key)
    assert (await store.reserve(request)).ok
    assert (await store.reserve(request)).refusal is Refusal.CANCELLED
    tally = await store.tally("key", key.id, PERIODS.day)
    assert (tally.held, tally.requests) == (PRICE, 1)


async def test_budgets_refuse_at_every_level(store: Store) -> None:
    key = new_key(daily_micros=2 * PRICE)
    await store.add_key(key)
    assert (await store.reserve(hold(key))).ok
    assert (await store.reserve(hold(key))).ok
    refused = await store.reserve(hold(key))
    assert refused.refusal is Refusal.KEY_DAILY

    monthly = new_key(monthly_micros=PRICE)
    await store.add_key(monthly)
    assert (await store.reserve(hold(monthly))).ok
    assert (await store.reserve(hold(monthly))).refusal is Refusal.KEY_MONTHLY

    await store.put_team(Team("t1", Limits(daily_micros=3 * PRICE, monthly_micros=10 * PRICE)))
    a, b = new_key(team="t1"), new_key(team="t1")
    await store.add_key(a)
    await store.add_key(b)
    assert (await store.reserve(hold(a))).ok
    assert (await store.reserve(hold(b))).ok
    last = await store.reserve(hold(a))
    assert last.ok and last.team_remaining == {PERIODS.day: 0, PERIODS.month: 7 * PRICE}
    assert (await store.reserve(hold(b))).refusal is Refusal.TEAM_DAILY
    team = await store.tally("team", "t1", PERIODS.day)
    assert (team.held, team.limit, team.remaining) == (3 * PRICE, 3 * PRICE, 0)


async def test_partial_and_uncertain_settle(store: Store) -> None:
    key = new_key(daily_micros=10 * PRICE)
    await store.add_key(key)
    h = hold(key, amount=3 * PRICE)
    assert (await store.reserve(h)).ok
    assert await store.settle(h.hold_id, 2 * PRICE, PRICE)
    tally = await store.tally("key", key.id, PERIODS.day)
    assert (tally.held, tally.spent, tally.uncertain) == (0, 2 * PRICE, PRICE)
    assert tally.remaining == 8 * PRICE


async def test_revoked_and_unknown_keys_are_refused(store: Store) -> None:
    key = new_key()
    await store.add_key(key)
    await store.update_key(key.id, revoked=True)
    assert (await store.reserve(hold(key))).refusal is Refusal.REVOKED
    ghost = new_key()
    assert (await store.reserve(hold(ghost))).refusal is Refusal.UNKNOWN_KEY


async def test_concurrency_limit_frees_on_settle(store: Store) -> None:
    key = new_key(concurrency=2)
    await store.add_key(key)
    h1, h2 = hold(key), hold(key)
    assert (await store.reserve(h1)).ok
    assert (await store.reserve(h2)).ok
    refused = await store.reserve(hold(key))
    assert refused.refusal is Refusal.CONCURRENCY and refused.retry_after
    await store.settle(h1.hold_id, PRICE)
    assert (await store.reserve(hold(key))).ok


async def test_rpm_is_gcra_with_retry_after(store: Store) -> None:
    key = new_key(rpm=6)
    await store.add_key(key)
    for _ in range(6):
        h = hold(key)
        assert (await store.reserve(h)).ok
        await store.release(h.hold_id)
    refused = await store.reserve(hold(key))
    assert refused.refusal is Refusal.RPM
    assert refused.retry_after is not None and 0 < refused.retry_after <= 10.0


async def test_expired_hold_becomes_uncertain_and_frees_the_key(store: Store) -> None:
    key = new_key(concurrency=1, daily_micros=PRICE * 5)
    await store.add_key(key)
    stale = hold(key, ttl=0.2)
    assert (await store.reserve(stale)).ok
    assert (await store.reserve(hold(key))).refusal is Refusal.CONCURRENCY
    await asyncio.sleep(0.3)
    # The next reserve sweeps the group: the key is usable again.
    fresh = hold(key)
    assert (await store.reserve(fresh)).ok
    assert not await store.settle(stale.hold_id, 0)  # too late: it stays uncertain spend
    tally = await store.tally("key", key.id, PERIODS.day)
    assert (tally.held, tally.spent, tally.uncertain) == (PRICE, PRICE, PRICE)
    assert await store.holds_outstanding() == 1


async def test_expire_sweep(store: Store) -> None:
    key = new_key()
    await store.add_key(key)
    assert (await store.reserve(hold(key, ttl=0.1))).ok
    await asyncio.sleep(0.2)
    assert await store.expire_holds() == 1
    assert await store.expire_holds() == 0
    assert await store.holds_outstanding() == 0


async def test_idempotency_records(store: Store) -> None:
    scope = "abc@k:key_1"
    assert (await store.idem_begin(scope, "fp1", 10, join_only=True)).state is IdemState.NEW
    assert (await store.idem_begin(scope, "fp1", 10)).state is IdemState.NEW
    assert (await store.idem_begin(scope, "fp1", 10)).state is IdemState.IN_FLIGHT
    assert (await store.idem_begin(scope, "fp2", 10)).state is IdemState.MISMATCH
    done = IdemRecord(IdemState.DONE, 200, "res1", (("x-proxy-adjusted", "n=1"),))
    await store.idem_finish(scope, done, 10)
    assert await store.idem_begin(scope, "fp1", 10) == done
    await store.idem_abandon(scope, "", 10)
    assert (await store.idem_begin(scope, "fp1", 10)).state is IdemState.NEW


async def test_abandon_that_arrives_before_its_claim_leaves_no_ghost(store: Store) -> None:
    # A claim whose answer timed out is abandoned; the abandon may land first.
    scope = "ghost@k:key_2"
    await store.idem_abandon(scope, "owner-a", 10)
    assert (await store.idem_begin(scope, "fp", 10, owner="owner-a")).state is IdemState.NEW
    # The late claim took nothing: the next caller owns the scope at once.
    assert (await store.idem_begin(scope, "fp", 10, owner="owner-b")).state is IdemState.NEW
    assert (await store.idem_begin(scope, "fp", 10, owner="c")).state is IdemState.IN_FLIGHT
    # Only the owner's abandon frees a claim; another owner's leaves it in place.
    await store.idem_abandon(scope, "owner-a", 10)
    assert (await store.idem_begin(scope, "fp", 10, owner="c")).state is IdemState.IN_FLIGHT
    await store.idem_abandon(scope, "owner-b", 10)
    assert (await store.idem_begin(scope, "fp", 10, owner="c")).state is IdemState.NEW


async def test_reserve_takes_a_free_claim_with_the_hold(store: Store) -> None:
    key = new_key(daily_micros=PRICE)
    await store.add_key(key)
    scope = f"first@{group_of(key.id, key.team)}"
    first = replace(hold(key), claim=ClaimRequest(scope, "fp", 10, "owner-a"))
    assert (await store.reserve(first)).claimed
    assert (await store.idem_begin(scope, "fp", 10, join_only=True)).state is IdemState.IN_FLIGHT
    # Refused for budget: no hold, and no claim either.
    other = f"second@{group_of(key.id, key.team)}"
    refused = await store.reserve(replace(hold(key), claim=ClaimRequest(other, "fp", 10, "b")))
    assert refused.refusal is Refusal.KEY_DAILY and not refused.claimed
    assert (await store.idem_begin(other, "fp", 10, join_only=True)).state is IdemState.NEW


async def test_reserve_leaves_a_taken_or_abandoned_claim_alone(store: Store) -> None:
    key = new_key()
    await store.add_key(key)
    scope = f"taken@{group_of(key.id, key.team)}"
    assert (await store.idem_begin(scope, "fp", 10, owner="a")).state is IdemState.NEW
    second = await store.reserve(replace(hold(key), claim=ClaimRequest(scope, "fp", 10, "b")))
    assert second.ok and not second.claimed  # an identical call in flight: one of its own
    await store.idem_abandon(scope, "a", 10)
    await store.idem_abandon(scope, "c", 10)  # c's reserve timed out; it lands after this
    late = await store.reserve(replace(hold(key), claim=ClaimRequest(scope, "fp", 10, "c")))
    assert late.ok and not late.claimed
    assert (await store.idem_begin(scope, "fp", 10, join_only=True)).state is IdemState.NEW


@pytest.mark.cases(50)
async def test_concurrent_reserves_never_overdraw(store: Store) -> None:
    key = new_key(daily_micros=10 * PRICE)
    await store.add_key(key)
    results = await asyncio.gather(*(store.reserve(hold(key)) for _ in range(50)))
    assert sum(r.ok for r in results) == 10
    assert all(r.refusal is Refusal.KEY_DAILY for r in results if not r.ok)


async def test_zero_limits_allow_nothing_and_none_is_no_limit(store: Store) -> None:
    free = new_key()  # every limit None
    await store.add_key(free)
    for _ in range(3):
        assert (await store.reserve(hold(free))).ok
    tally = await store.tally("key", free.id, PERIODS.day)
    assert (tally.limit, tally.remaining, tally.as_usd()["limit_usd"]) == (None, None, None)

    for limits, refusal in (
        ({"daily_micros": 0}, Refusal.KEY_DAILY),
        ({"monthly_micros": 0}, Refusal.KEY_MONTHLY),
        ({"rpm": 0}, Refusal.ZERO_LIMIT),
        ({"concurrency": 0}, Refusal.ZERO_LIMIT),
    ):
        key = new_key(**limits)
        await store.add_key(key)
        assert await store.key(key.id) == key  # 0 is kept as 0, not read back as None
        refused = await store.reserve(hold(key))
        assert refused.refusal is refusal, limits
    zero = new_key(daily_micros=0)
    await store.add_key(zero)
    await store.reserve(hold(zero))
    tally = await store.tally("key", zero.id, PERIODS.day)
    assert (tally.limit, tally.remaining, tally.held, tally.spent) == (0, 0, 0, 0)
    assert tally.as_usd()["limit_usd"] == 0.0 and tally.as_usd()["remaining_usd"] == 0.0

    await store.put_team(Team("frozen", Limits(daily_micros=0)))
    member = new_key(team="frozen")
    await store.add_key(member)
    assert (await store.reserve(hold(member))).refusal is Refusal.TEAM_DAILY
    team = await store.team("frozen")
    assert team is not None and team.limits == Limits(daily_micros=0)
    assert team.public()["daily_usd"] == 0.0 and team.public()["monthly_usd"] is None
    # From 0 back to no limit: the key spends again.
    await store.update_key(zero.id, limits=Limits())
    assert (await store.reserve(hold(zero))).ok
    await store.put_team(Team("frozen", Limits()))
    assert (await store.reserve(hold(member))).ok


async def test_seed_team_creates_only_an_absent_team(store: Store) -> None:
    seed = Team("design", Limits(daily_micros=90_000))
    assert await store.seed_team(seed)
    assert await store.team("design") == seed
    cut = Team("design", Limits(daily_micros=30_000))
    await store.put_team(cut)  # an emergency cut through the admin API
    assert not await store.seed_team(seed)
    assert await store.team("design") == cut
    # A seed with no budget at all is still a team, and still not overwritten.
    assert await store.seed_team(Team("open", Limits()))
    assert not await store.seed_team(Team("open", Limits(daily_micros=0)))
    assert await store.team("open") == Team("open", Limits())
    assert [t.name for t in await store.teams()] == ["design", "open"]


class Heard:
    """A cache, as far as the subscriber to key changes can tell: what it was told."""

    def __init__(self) -> None:
        self.forgotten: list[str] = []
        self.clears = 0

    def forget(self, key_hash: str) -> None:
        self.forgotten.append(key_hash)

    def clear(self) -> None:
        self.clears += 1


async def eventually(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)


async def test_every_change_to_a_key_record_is_announced(store: Store) -> None:
    invalidations = store.invalidations()
    if invalidations is None:
        assert isinstance(store, MemoryStore)  # no other process writes it
        return
    heard, losses = Heard(), []
    invalidations.start(heard, lambda: losses.append(1))
    try:
        # Subscribed (the cache dropped, in case changes were missed) and heard.
        await eventually(lambda: invalidations.trusted(-math.inf, time.monotonic()))
        assert heard.clears == 1
        key = new_key(team="design", daily_micros=PRICE)
        await store.add_key(key)
        await store.update_key(key.id, revoked=True)
        await eventually(lambda: heard.forgotten == [key.key_hash])
        refused = new_key()  # a passthrough key the upstream refused
        await store.add_key(refused)
        assert await store.forget_key(refused.id, PERIODS)
        await eventually(lambda: heard.forgotten == [key.key_hash, refused.key_hash])
    finally:
        await invalidations.stop()
    assert losses == []


async def test_legacy_records_read_zero_as_no_limit(redis_for_store: RedisServer) -> None:
    # Records written before 0 meant "nothing" stored 0 for no limit and carry no
    # format mark; reading them as zero budgets would block every key on upgrade.
    store = RedisStore.from_settings(StoreSettings(url=redis_for_store.url, key_prefix="legacy"))
    try:
        key = new_key(team="old", daily_micros=PRICE)
        await store.add_key(key)
        record = f"legacy:{{{group_of(key.id, 'old')}}}:key:{key.id}"
        team = f"legacy:{{{group_of('', 'old')}}}:team"
        legacy = {"daily": 0, "monthly": 0, "rpm": 0, "concurrency": 0}
        await store.r.hset(record, mapping=legacy)
        await store.r.hdel(record, "format")
        await store.r.hset(team, mapping={"daily": 0, "monthly": 2 * PRICE})
        await store.r.sadd("legacy:teams", "old")

        read = await store.key(key.id)
        assert read is not None and read.limits == Limits()
        assert await store.team("old") == Team("old", Limits(monthly_micros=2 * PRICE))
        assert (await store.reserve(hold(key))).ok
        assert (await store.reserve(hold(key))).ok
        assert (await store.reserve(hold(key))).refusal is Refusal.TEAM_MONTHLY
        # A change rewrites the record in the new format, meaning the same.
        await store.update_key(key.id, name="renamed")
        assert await store.r.hget(record, "format") == "2"
        assert (await store.key(key.id)).limits == Limits()  # type: ignore[union-attr]
    finally:
        await store.close()


# leases, lost holds and consumed records ---------------------------------------------


async def test_renewed_holds_outlive_their_lease_and_lapse_once_not_renewed(
    store: Store,
) -> None:
    key = new_key(concurrency=1)
    await store.add_key(key)
    leased = hold(key, ttl=0.4)
    assert (await store.reserve(leased)).ok
    for _ in range(4):  # 0.8 s in all, twice the lease
        await asyncio.sleep(0.2)
        assert await store.renew_holds([leased.hold_id], 0.4) == 1
        assert await store.expire_holds() == 0
    assert (await store.reserve(hold(key))).refusal is Refusal.CONCURRENCY
    await asyncio.sleep(0.6)  # its replica stopped renewing
    fresh = hold(key)
    assert (await store.reserve(fresh)).ok  # the lapsed hold no longer blocks the key
    assert await store.renew_holds([leased.hold_id, "gone@k:x"], 0.4) == 0
    tally = await store.tally("key", key.id, PERIODS.day)
    assert (tally.held, tally.spent, tally.uncertain) == (PRICE, PRICE, PRICE)


async def test_a_claim_that_lived_with_a_lapsed_hold_ends_uncertain(store: Store) -> None:
    key = new_key()
    await store.add_key(key)
    scope = f"ik{next(_counter)}@{group_of(key.id, None)}"
    claim = ClaimRequest(scope, "fp", 10.0, "o1", keep_seconds=10.0)
    leased = replace(hold(key, ttl=0.3), claim=claim)
    assert (await store.reserve(leased)).claimed
    assert (await store.idem_begin(claim.scope, "fp", 10.0, join_only=True)).state is (
        IdemState.IN_FLIGHT
    )
    await asyncio.sleep(0.5)
    assert await store.expire_holds() == 1
    record = await store.idem_begin(claim.scope, "fp", 10.0, join_only=True)
    assert (record.state, record.status) == (IdemState.DONE, 504)


async def test_a_settle_whose_hold_is_gone_books_the_spend_once(store: Store) -> None:
    key = new_key(team="design")
    await store.add_key(key)
    lost = hold(key)  # never reserved here: the store that had it lost its data
    done = await store.settle(lost.hold_id, PRICE, 0, request=lost)
    assert done is Settlement.BOOKED_WITHOUT_HOLD
    again = await store.settle(lost.hold_id, PRICE, 0, request=lost)
    assert again is Settlement.NOTHING
    for scope, name in (("key", key.id), ("team", "design")):
        for period in (PERIODS.day, PERIODS.month):
            tally = await store.tally(scope, name, period)
            assert (tally.held, tally.spent, tally.uncertain, tally.requests) == (0, PRICE, 0, 1)
    # A release of a hold never seen books nothing and keeps a late reserve out.
    released = hold(key)
    assert await store.settle(released.hold_id, 0, 0, request=released) is Settlement.NOTHING
    assert (await store.reserve(released)).refusal is Refusal.CANCELLED


async def test_a_consumed_record_is_forgotten_only_for_its_own_answer(store: Store) -> None:
    scope = f"rj{next(_counter)}@k:x"
    assert (await store.idem_begin(scope, "fp", 10.0, owner="o")).state is IdemState.NEW
    await store.idem_finish(scope, IdemRecord(IdemState.DONE, 200, "result-1"), 10.0)
    await store.idem_consume(scope, "result-2")
    assert (await store.idem_begin(scope, "fp", 10.0, join_only=True)).result_id == "result-1"
    await store.idem_consume(scope, "result-1")
    assert (await store.idem_begin(scope, "fp", 10.0, join_only=True)).state is IdemState.NEW


async def test_the_sweep_visits_only_groups_with_holds(redis_for_store: RedisServer) -> None:
    store = RedisStore.from_settings(
        StoreSettings(url=redis_for_store.url, key_prefix=f"t{next(_counter)}")
    )
    try:
        idle = [new_key() for _ in range(50)]
        for key in idle:
            await store.add_key(key)
        busy = new_key()
        await store.add_key(busy)
        assert (await store.reserve(hold(busy))).ok
        await asyncio.sleep(0.05)  # the group's note lands off the request path
        swept: list[str] = []
        original = store._run

        async def counting(script: object, keys: list[str], args: list[object]) -> object:
            swept.append(keys[0])
            return await original(script, keys, args)

        store._run = counting  # type: ignore[method-assign]
        await store.expire_holds()
        assert swept == [store._base(group_of(busy.id, None)) + "holds"]
        assert await store.holds_outstanding() == 1
    finally:
        await store.close()


# one reading of the URL for both connections -----------------------------------------


async def test_both_connections_use_the_database_the_url_names(
    redis_for_store: RedisServer,
) -> None:
    # redis-py reads ``?db=`` over the path; the scripts' connection must agree, or a
    # key written through one is missing on the other and every call is refused.
    url = f"redis://127.0.0.1:{redis_for_store.port}/0?db=5"
    store = RedisStore.from_settings(StoreSettings(url=url, key_prefix=f"t{next(_counter)}"))
    try:
        key = new_key()
        await store.add_key(key)
        assert await store.key_by_hash(key.key_hash) == key
        assert (await store.reserve(hold(key))).ok
        assert "db=5" in await store.r.execute_command("CLIENT", "INFO")
    finally:
        await store.close()


async def test_ping_answers_for_the_scripts_connection_too(redis_for_store: RedisServer) -> None:
    # /readyz asks the store; the money scripts do not go through redis-py's client.
    settings = StoreSettings(url=redis_for_store.url, timeout_seconds=0.5)
    nowhere = MultiplexedConnection(RedisTarget("127.0.0.1", free_port()), 0.5)
    store = RedisStore(connect(settings.url, settings), scripts=nowhere)
    try:
        with pytest.raises(StoreError):
            await store.ping()
    finally:
        await store.close()
