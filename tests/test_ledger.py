"""The ledger's background refresh: config teams re-seeded, never overwritten."""

from __future__ import annotations

import asyncio
import os

from proxy import config
from proxy.ledger import Ledger
from proxy.limits import Limits
from proxy.metrics import Metrics
from proxy.store import Team
from proxy.store.redis import RedisStore

from .conftest import RedisServer


def test_budget_refresh_restores_a_lost_config_team(redis_server: RedisServer) -> None:
    settings = config.load(
        path=os.devnull,
        env={
            "APIYI_PROXY_STORE_URL": redis_server.url,
            "APIYI_PROXY_KEY_PEPPER": "pepper-for-tests-0123456789abcdef",
        },
        overrides={"ledger": {"teams": {"design": {"daily_usd": 0.09}}}},
    )
    seeded = Team("design", Limits(daily_micros=90_000))
    cut = Team("design", Limits(daily_micros=30_000))

    async def run() -> None:
        store = RedisStore.from_settings(settings.store)
        ledger = Ledger(store, settings, Metrics())
        try:
            await ledger.refresh_budgets()
            assert await store.team("design") == seeded
            await store.put_team(cut)
            await ledger.refresh_budgets()
            assert await store.team("design") == cut  # an admin change stays
            await store.r.flushall()
            await ledger.refresh_budgets()  # the periodic refresh, no restart
            assert await store.team("design") == seeded
            assert [t.name for t in await store.teams()] == ["design"]
        finally:
            await store.close()

    asyncio.run(run())
