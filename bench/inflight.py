"""S3: many requests in flight at once against a slow upstream: memory and CPU per request."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from . import services
from .context import Context, percentile, run_loadgen
from .procs import cpu_seconds, rss_kib
from .report import Row, Value, ratio
from .services import Endpoint, direct
from .wrk import GENERATION

SCENARIO = "S3 in-flight capacity"


@dataclass
class InFlight:
    count: int
    latency: float
    idle_kib: int = 0
    plateau_kib: int = 0
    cpu_seconds: float = 0.0
    all_in_flight: bool = False
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    @property
    def kib_per_request(self) -> float:
        return (self.plateau_kib - self.idle_kib) / self.count

    def values(self) -> dict[str, Value]:
        p50 = percentile(self.latencies, 0.5)
        return {
            "in flight": self.count,
            "reached upstream": "all" if self.all_in_flight else "NOT all",
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            "idle RSS MiB": self.idle_kib / 1024,
            "plateau RSS MiB": self.plateau_kib / 1024,
            "KiB RSS per in-flight": self.kib_per_request,
            "CPU ms/req": 1000 * self.cpu_seconds / self.count,
            "latency p50 - upstream ms": None if p50 is None else 1000 * (p50 - self.latency),
            "latency max - upstream ms": (
                1000 * (max(self.latencies) - self.latency) if self.latencies else None
            ),
        }


def measure(
    ctx: Context, endpoint: Endpoint, fake_url: str, count: int, latency: float
) -> InFlight:
    """Hold ``count`` requests open through ``endpoint`` at once; the fake sleeps ``latency``."""
    result = InFlight(count, latency)
    services.reset_fake(fake_url)
    time.sleep(1.0)
    result.idle_kib = rss_kib(endpoint.pid)
    cpu_before = cpu_seconds(endpoint.pid)
    full_at: float | None = None
    last_poll = 0.0
    plateau: list[int] = []

    def tick() -> None:
        nonlocal full_at, last_poll
        now = time.monotonic()
        if full_at is None and now - last_poll >= 1.0:
            last_poll = now
            if services.fake_requests(fake_url) >= count:
                full_at = now
        # Plateau: between 1 and 3 s after the last request reached the upstream.
        if full_at is not None and 1.0 <= now - full_at <= 3.0:
            plateau.append(rss_kib(endpoint.pid))

    body = dict(GENERATION, prompt=f"a lighthouse at dawn [fake:latency={latency:g}]")
    conf = {
        "mode": "hold",
        "url": endpoint.base_url + "/images/generations",
        "key": endpoint.key,
        "body": json.dumps(body),
        "count": count,
        "timeout": latency + 60,
    }
    records = run_loadgen(ctx.work_dir, conf, timeout=latency + 120, on_tick=tick)
    result.cpu_seconds = cpu_seconds(endpoint.pid) - cpu_before
    result.all_in_flight = full_at is not None
    result.plateau_kib = max(plateau) if plateau else rss_kib(endpoint.pid)
    for status, start, end, _size, note in records:
        if status == 200:
            result.ok += 1
            result.latencies.append(end - start)
        else:
            reason = str(status) if status else note
            result.errors[reason] = result.errors.get(reason, 0) + 1
    return result


def run(ctx: Context) -> None:
    plan = ctx.plan
    latency = plan.s3_latency
    found: dict[tuple[str, int], InFlight] = {}
    with ctx.scope() as scope:
        fake, fake_url = scope.fake()
        _, redis_url = scope.redis()
        for count in plan.s3_counts:
            found[("direct", count)] = measure(
                ctx, direct(fake_url, fake.pid), fake_url, count, latency
            )
        nginx = scope.nginx(fake_url)
        if nginx is not None:
            for count in plan.s3_counts:
                found[("nginx", count)] = measure(ctx, nginx, fake_url, count, latency)
        for count in plan.s3_counts:
            with scope.proxy(fake_url, store_url=redis_url) as proxy:
                found[("proxy (redis store)", count)] = measure(
                    ctx, proxy, fake_url, count, latency
                )
    for (name, count), r in found.items():
        values = r.values()
        base = found[("direct", count)]
        ngx = found.get(("nginx", count))
        base_p50 = percentile(base.latencies, 0.5)
        p50 = percentile(r.latencies, 0.5)
        values["added p50 vs direct ms"] = (
            1000 * (p50 - base_p50) if p50 is not None and base_p50 is not None else None
        )
        values["RSS/in-flight / nginx"] = ratio(
            r.kib_per_request, ngx.kib_per_request if ngx else None
        )
        if r.errors:
            values["error kinds"] = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items()))
        ctx.report.add(Row(SCENARIO, f"{name}, {count} in flight", values))
    ctx.report.note(
        SCENARIO,
        f"Upstream latency {latency:g} s ([fake:latency={latency:g}] in the prompt). One "
        "connection per request from an asyncio load generator in its own process (CPU "
        f"{services.LOAD_CPU}). RSS is VmRSS of the measured process: idle before the run, "
        "plateau = max over 1-3 s after every request reached the fake upstream. CPU = "
        "utime+stime delta over the whole run divided by the request count. For 'direct' the "
        "measured process is the fake upstream itself; for nginx its one worker.",
    )
