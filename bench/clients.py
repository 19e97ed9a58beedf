"""Upstream client comparison: aiohttp vs httpx vs httpx over the aiohttp transport."""

from __future__ import annotations

from . import inflight, services
from .context import Context
from .report import Row, Value, ratio
from .throughput import Saturation, saturate

SCENARIO = "Upstream client comparison"
CONNECTIONS = 64


def run(ctx: Context) -> None:
    plan = ctx.plan
    sat: dict[str, Saturation] = {}
    held: dict[str, inflight.InFlight] = {}
    nginx_rps: float | None = None
    with ctx.scope() as scope:
        _, fake_url = scope.fake()
        _, redis_url = scope.redis()
        nginx = scope.nginx(fake_url)
        if nginx is not None:
            nginx_rps = saturate(ctx, nginx, CONNECTIONS, plan.s2_seconds, fake_url).result.rps
        for client in services.CLIENTS:
            with scope.proxy(fake_url, store_url=redis_url, client=client) as proxy:
                sat[client] = saturate(ctx, proxy, CONNECTIONS, plan.s2_seconds, fake_url)
            with scope.proxy(fake_url, store_url=redis_url, client=client) as proxy:
                held[client] = inflight.measure(
                    ctx, proxy, fake_url, plan.clients_inflight, plan.s3_latency
                )
    base = sat["aiohttp"].result.rps
    base_kib = held["aiohttp"].kib_per_request
    for client in services.CLIENTS:
        s, h = sat[client], held[client]
        hv = h.values()
        values: dict[str, Value] = {
            "req/s @64": s.result.rps,
            "errors @64": s.result.errors,
            "CPU ms/req @64": s.cpu_ms_per_request,
            "req/s / nginx": ratio(s.result.rps, nginx_rps),
            "req/s / aiohttp": ratio(s.result.rps, base),
            "in flight": h.count,
            "in-flight errors": sum(h.errors.values()),
            "KiB RSS per in-flight": h.kib_per_request,
            "KiB / aiohttp": ratio(h.kib_per_request, base_kib),
            "CPU ms/req in flight": hv["CPU ms/req"],
            "latency p50 - upstream ms": hv["latency p50 - upstream ms"],
        }
        if h.errors:
            values["error kinds"] = ", ".join(f"{k}: {v}" for k, v in sorted(h.errors.items()))
        ctx.report.add(Row(SCENARIO, client, values))
    if nginx_rps is not None:
        ctx.report.note(
            SCENARIO,
            f"nginx at {CONNECTIONS} connections in this scenario: {nginx_rps:,.0f} req/s.",
        )
    ctx.report.note(
        SCENARIO,
        "Proxy with the redis store, one worker. Throughput as in S2 at 64 connections; "
        f"in-flight as in S3 ({plan.clients_inflight} requests, upstream latency "
        f"{plan.s3_latency:g} s). 'httpx-aiohttp' runs through bench/httpx_aiohttp_serve.py "
        "(a bench harness: proxy/upstream.py has no such option).",
    )
