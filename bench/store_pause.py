"""S5: the Redis store frozen (SIGSTOP) under load: every answer a 503, quickly, RSS bounded."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

from .context import Context, percentile, run_loadgen
from .procs import rss_kib
from .report import Row, Value
from .services import Endpoint
from .wrk import GENERATION

SCENARIO = "S5 Redis paused"
STORE_TIMEOUT = 0.5  # store.timeout_seconds, default


def burst(ctx: Context, endpoint: Endpoint, seconds: float) -> dict[str, Value]:
    rss: list[int] = []
    before = rss_kib(endpoint.pid)
    conf = {
        "mode": "burst",
        "url": endpoint.base_url + "/images/generations",
        "key": endpoint.key,
        "body": json.dumps(GENERATION),
        "concurrency": ctx.plan.s5_concurrency,
        "seconds": seconds,
        "timeout": 10,
    }
    records = run_loadgen(
        ctx.work_dir, conf, timeout=seconds + 60, on_tick=lambda: rss.append(rss_kib(endpoint.pid))
    )
    after = rss_kib(endpoint.pid)
    times = [r[2] - r[1] for r in records]
    statuses: dict[str, int] = {}
    for r in records:
        key = str(r[0]) if r[0] else r[4]
        statuses[key] = statuses.get(key, 0) + 1
    p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
    worst = max(times) if times else None
    return {
        "requests": len(records),
        "statuses": ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
        "non-503": len(records) - statuses.get("503", 0),
        "p50 ms": None if p50 is None else 1000 * p50,
        "p99 ms": None if p99 is None else 1000 * p99,
        "max ms": None if worst is None else 1000 * worst,
        "max / store timeout": None if worst is None else worst / STORE_TIMEOUT,
        "over timeout": sum(1 for t in times if t > STORE_TIMEOUT),
        "RSS before MiB": before / 1024,
        "RSS max during MiB": max(rss, default=before) / 1024,
        "RSS after MiB": after / 1024,
    }


def first_success(endpoint: Endpoint, limit: float) -> float | None:
    """Seconds until a request succeeds again, or None within ``limit``."""
    started = time.monotonic()
    request = urllib.request.Request(
        endpoint.base_url + "/images/generations",
        data=json.dumps(GENERATION).encode(),
        headers={"authorization": f"Bearer {endpoint.key}", "content-type": "application/json"},
    )
    while time.monotonic() - started < limit:
        try:
            with urllib.request.urlopen(request, timeout=5):
                return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    return None


def run(ctx: Context) -> None:
    seconds = ctx.plan.s5_seconds
    with ctx.scope() as scope:
        _, fake_url = scope.fake()
        redis, redis_url = scope.redis()
        with scope.proxy(fake_url, store_url=redis_url) as proxy:
            running = burst(ctx, proxy, min(seconds, 5))
            redis.signal(signal.SIGSTOP)
            try:
                paused = burst(ctx, proxy, seconds)
            finally:
                redis.signal(signal.SIGCONT)
            paused["recovered after SIGCONT s"] = first_success(proxy, 20)
    ctx.report.add(Row(SCENARIO, "proxy, redis running (baseline)", running))
    ctx.report.add(Row(SCENARIO, "proxy, redis paused (SIGSTOP)", paused))
    ctx.report.note(
        SCENARIO,
        f"{ctx.plan.s5_concurrency} keep-alive clients (asyncio load generator) sending back to "
        f"back for {seconds:g} s while redis-server is stopped with SIGSTOP; answer time is "
        f"measured by the client per request; store.timeout_seconds = {STORE_TIMEOUT}.",
    )
