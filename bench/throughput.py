"""S2: saturation throughput, one proxy worker, auth + policy + holds + metrics on."""

from __future__ import annotations

from dataclasses import dataclass

from . import services, wrk
from .context import Context
from .procs import cpu_seconds
from .report import Row, ratio
from .services import Endpoint, direct

SCENARIO = "S2 saturation throughput"


@dataclass(frozen=True)
class Saturation:
    result: wrk.WrkResult
    cpu_seconds: float  # used by the measured process during the run

    @property
    def cpu_share(self) -> float:
        return self.cpu_seconds / self.result.seconds

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu_seconds / max(1, self.result.requests)


def saturate(
    ctx: Context, endpoint: Endpoint, connections: int, seconds: float, fake_url: str
) -> Saturation:
    wrk.run(endpoint, connections, min(2.0, seconds / 2), ctx.work_dir)  # warm-up
    services.reset_fake(fake_url)
    before = cpu_seconds(endpoint.pid)
    result = wrk.run(endpoint, connections, seconds, ctx.work_dir)
    used = cpu_seconds(endpoint.pid) - before
    services.reset_fake(fake_url)  # the fake keeps a log of every request
    return Saturation(result, used)


def run(ctx: Context) -> None:
    plan = ctx.plan
    found: dict[tuple[str, int], Saturation] = {}
    with ctx.scope() as scope:
        fake, fake_url = scope.fake()
        _, redis_url = scope.redis()
        targets: list[tuple[str, dict[str, object]]] = [
            ("proxy (memory store)", {"store_url": "memory://"}),
            ("proxy (redis store)", {"store_url": redis_url}),
            ("proxy (redis store, access log on)", {"store_url": redis_url, "access_log": True}),
        ]

        def measure(name: str, endpoint: Endpoint, connections: tuple[int, ...]) -> None:
            for c in connections:
                found[(name, c)] = saturate(ctx, endpoint, c, plan.s2_seconds, fake_url)

        measure("direct", direct(fake_url, fake.pid), plan.s2_connections)
        nginx = scope.nginx(fake_url)
        if nginx is not None:
            measure("nginx", nginx, plan.s2_connections)
        for name, options in targets:
            with scope.proxy(fake_url, **options) as proxy:
                conns = plan.s2_connections if "access" not in name else plan.s2_connections[-1:]
                measure(name, proxy, conns)
    for (name, c), sat in found.items():
        base = found[("direct", c)].result.rps
        ngx = found.get(("nginx", c))
        r = sat.result
        ctx.report.add(
            Row(
                SCENARIO,
                f"{name}, {c} conns",
                {
                    "req/s": r.rps,
                    "errors": r.errors,
                    "p50 ms": r.p50_ms,
                    "p99 ms": r.p99_ms,
                    "CPU of measured process %": 100 * sat.cpu_share,
                    "CPU ms/req": sat.cpu_ms_per_request,
                    "/ direct": ratio(r.rps, base),
                    "/ nginx": ratio(r.rps, ngx.result.rps if ngx else None),
                },
            )
        )
    ctx.report.note(
        SCENARIO,
        f"wrk -t1 -cN -d{plan.s2_seconds:g}s (Lua: POST JSON + bearer key), after a warm-up. "
        f"Measured process (proxy or nginx worker) pinned to CPU {services.SUT_CPU}; wrk, "
        f"fake upstream and redis-server pinned to CPU {services.LOAD_CPU}. For 'direct' the "
        "measured process is the fake upstream. Every proxy request authenticates a key, "
        "applies the policy, takes and settles a budget hold and updates the metrics.",
    )
