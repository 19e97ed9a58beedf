"""What every scenario shares: the run's sizes, its report, and a scope that owns processes."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from . import services
from .procs import Proc
from .report import Report
from .services import LOAD_CPU, Endpoint


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; ``quick`` keeps the whole run to a few minutes."""

    s1_seconds: float
    s2_seconds: float
    s2_connections: tuple[int, ...]
    s3_counts: tuple[int, ...]
    s3_latency: float
    s4_bodies: int
    s4_image_bytes: int
    s4_slow_rate: float
    s5_seconds: float
    s5_concurrency: int
    clients_inflight: int

    @classmethod
    def of(cls, quick: bool) -> Plan:
        if quick:
            return cls(3, 4, (32, 64), (500,), 5, 10, 20_000_000, 5e6, 4, 32, 500)
        return cls(10, 15, (32, 64), (1000, 5000), 30, 10, 20_000_000, 1e6, 10, 64, 5000)


@dataclass
class Context:
    plan: Plan
    report: Report
    work_dir: Path
    use_nginx: bool
    source: Path = services.ROOT  # the directory ``python -m proxy`` runs from

    def scope(self) -> Scope:
        return Scope(self)


class Scope:
    """Starts processes for one scenario and stops every one of them on exit."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Scope:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()

    def own(self, proc: Proc) -> Proc:
        self._stack.callback(proc.stop)
        return proc

    def fake(self, latency: float = 0.0) -> tuple[Proc, str]:
        proc, url = services.start_fake(self.ctx.work_dir, self.ctx.source, latency)
        return self.own(proc), url

    def redis(self) -> tuple[Proc, str]:
        proc, url = services.start_redis(self.ctx.work_dir)
        return self.own(proc), url

    def nginx(self, upstream_url: str) -> Endpoint | None:
        if not self.ctx.use_nginx:
            return None
        started = services.start_nginx(self.ctx.work_dir, upstream_url)
        if started is None:
            return None
        self.own(started[0])
        return started[1]

    @contextlib.contextmanager
    def proxy(self, upstream_url: str, **options: Any) -> Iterator[Endpoint]:
        """A proxy for the length of the block (fresh RSS and CPU counters each time)."""
        proc, endpoint = services.start_proxy(
            self.ctx.work_dir, upstream_url, source=self.ctx.source, **options
        )
        try:
            yield endpoint
        finally:
            proc.stop()


def run_loadgen(
    work_dir: Path,
    conf: dict[str, Any],
    timeout: float,
    on_tick: Callable[[], None] | None = None,
    tick: float = 0.25,
) -> list[list[Any]]:
    """Run ``bench.loadgen`` in its own process on LOAD_CPU, calling ``on_tick`` meanwhile."""
    stamp = f"{time.monotonic_ns()}"
    conf_path = work_dir / f"loadgen-{stamp}.json"
    out_path = work_dir / f"loadgen-{stamp}.out.json"
    conf_path.write_text(json.dumps({**conf, "out": str(out_path)}))
    argv = [sys.executable, "-m", "bench.loadgen", str(conf_path)]
    proc = Proc(f"loadgen-{stamp}", argv, work_dir, cpu=LOAD_CPU, cwd=services.ROOT)
    try:
        deadline = time.monotonic() + timeout
        while proc.alive() and time.monotonic() < deadline:
            if on_tick is not None:
                on_tick()
            time.sleep(tick)
        if proc.alive():
            proc.signal(signal.SIGKILL)
            raise RuntimeError(f"load generator still running after {timeout:.0f} s")
        if proc.popen.returncode != 0:
            raise RuntimeError(f"load generator failed:\n{proc.log_tail()}")
        records: list[list[Any]] = json.loads(out_path.read_text())
        return records
    finally:
        proc.stop()


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]
