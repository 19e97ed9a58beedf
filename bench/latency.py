"""S1: latency the proxy adds at concurrency 1 (fake upstream latency 0, ``url`` answers)."""

from __future__ import annotations

from . import wrk
from .context import Context
from .report import Row, ratio
from .services import Endpoint, direct

SCENARIO = "S1 added latency, concurrency 1"


def run(ctx: Context) -> None:
    seconds = ctx.plan.s1_seconds
    with ctx.scope() as scope:
        fake, fake_url = scope.fake()
        _, redis_url = scope.redis()
        results: dict[str, wrk.WrkResult] = {}

        def measure(endpoint: Endpoint) -> None:
            wrk.run(endpoint, 1, 1, ctx.work_dir)  # warm-up: connections, caches
            results[endpoint.name] = wrk.run(endpoint, 1, seconds, ctx.work_dir)

        measure(direct(fake_url, fake.pid))
        nginx = scope.nginx(fake_url)
        if nginx is not None:
            measure(nginx)
        for store_url in ("memory://", redis_url):
            with scope.proxy(fake_url, store_url=store_url) as proxy:
                measure(proxy)
    base = results["direct"]
    ngx = results.get("nginx")
    for name, r in results.items():
        ctx.report.add(
            Row(
                SCENARIO,
                name,
                {
                    "requests": r.requests,
                    "errors": r.errors,
                    "p50 ms": r.p50_ms,
                    "p99 ms": r.p99_ms,
                    "added p50 vs direct ms": r.p50_ms - base.p50_ms,
                    "added p99 vs direct ms": r.p99_ms - base.p99_ms,
                    "p50 / direct": ratio(r.p50_ms, base.p50_ms),
                    "p50 / nginx": ratio(r.p50_ms, ngx.p50_ms if ngx else None),
                },
            )
        )
    ctx.report.note(SCENARIO, f"wrk -t1 -c1 -d{seconds:g}s per target after a 1 s warm-up.")
