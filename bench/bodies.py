"""S4: ten concurrent 20 MB ``b64_json`` answers plus one slow reader: peak RSS growth."""

from __future__ import annotations

import json
import time

from .context import Context, run_loadgen
from .procs import hwm_kib, rss_kib
from .report import Row, Value, ratio
from .services import Endpoint, direct
from .wrk import GENERATION

SCENARIO = "S4 large bodies"
PREFIX = "data:image/png;base64,"


def _body(image_bytes: int) -> str:
    prompt = f"a lighthouse at dawn [fake:image-bytes={image_bytes}]"
    return json.dumps(dict(GENERATION, prompt=prompt, response_format="b64_json"))


def measure(ctx: Context, endpoint: Endpoint, watch: bool) -> dict[str, Value]:
    plan = ctx.plan
    url = endpoint.base_url + "/images/generations"
    warm = {"mode": "bodies", "url": url, "key": endpoint.key, "count": 2, "timeout": 60}
    run_loadgen(ctx.work_dir, {**warm, "body": _body(1_000_000)}, timeout=90)
    time.sleep(0.5)
    idle = rss_kib(endpoint.pid)
    peak = idle
    started = time.monotonic()

    def tick() -> None:
        nonlocal peak
        peak = max(peak, rss_kib(endpoint.pid))

    conf = {
        "mode": "bodies",
        "url": url,
        "key": endpoint.key,
        "body": _body(plan.s4_image_bytes),
        "count": plan.s4_bodies,
        "slow_rate": plan.s4_slow_rate,
        "timeout": 300,
    }
    records = run_loadgen(
        ctx.work_dir, conf, timeout=360, on_tick=tick if watch else None, tick=0.02
    )
    fast, slow = records[:-1], records[-1]
    ok = [r for r in fast if r[0] == 200]
    heads = [str(r[4]) for r in ok]
    values: dict[str, Value] = {
        "bodies ok": f"{len(ok)}/{len(fast)}",
        "body MB": (sum(r[3] for r in ok) / len(ok) / 1e6) if ok else None,
        "b64 prefix": _prefix(heads),
        "fast bodies wall s": max(r[2] for r in fast) - min(r[1] for r in fast),
        "slow reader": f"{slow[0]} {slow[3] / 1e6:.1f} MB",
        "slow reader MB/s": slow[3] / 1e6 / max(1e-9, slow[2] - slow[1]),
    }
    if watch:
        values["idle RSS MiB"] = idle / 1024
        values["peak RSS growth MiB (polled 20 ms)"] = (peak - idle) / 1024
        values["VmHWM - idle MiB"] = (hwm_kib(endpoint.pid) - idle) / 1024
        values["run s"] = time.monotonic() - started
    return values


def run(ctx: Context) -> None:
    found: dict[str, dict[str, Value]] = {}
    with ctx.scope() as scope:
        fake, fake_url = scope.fake()
        found["direct"] = measure(ctx, direct(fake_url, fake.pid), watch=False)
        nginx = scope.nginx(fake_url)
        if nginx is not None:
            found["nginx"] = measure(ctx, nginx, watch=True)
        with scope.proxy(fake_url) as proxy:
            found["proxy (memory store)"] = measure(ctx, proxy, watch=True)
    base = found["direct"]["fast bodies wall s"]
    for name, values in found.items():
        values["wall / direct"] = ratio(_num(values["fast bodies wall s"]), _num(base))
        growth = "peak RSS growth MiB (polled 20 ms)"
        if "nginx" in found and growth in values:
            values["growth / nginx"] = ratio(_num(values[growth]), _num(found["nginx"][growth]))
        ctx.report.add(Row(SCENARIO, name, values))
    plan = ctx.plan
    ctx.report.note(
        SCENARIO,
        f"{plan.s4_bodies} concurrent {plan.s4_image_bytes / 1e6:g} MB images as b64_json "
        f"([fake:image-bytes={plan.s4_image_bytes}]), read at full speed, plus one more read "
        f"at {plan.s4_slow_rate / 1e6:g} MB/s. RSS growth is measured against the idle RSS "
        "after a warm-up (two 1 MB images); VmHWM also counts any earlier peak since start. "
        "nginx keeps its defaults (proxy_buffering on: it spools to temp files).",
    )


def _prefix(heads: list[str]) -> str:
    if not heads or not all('"b64_json":"' in h for h in heads):
        return "?"
    kept = sum(PREFIX in h for h in heads)
    return "stripped" if kept == 0 else ("kept" if kept == len(heads) else "mixed")


def _num(value: Value) -> float | None:
    return float(value) if isinstance(value, int | float) else None
