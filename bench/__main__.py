"""``python -m bench [SCENARIO ...] [--quick] [--out DIR]``: run, print tables, save results."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from . import (
    bodies,
    clients,
    environment,
    inflight,
    latency,
    services,
    source,
    store_pause,
    throughput,
    wrk,
)
from .context import Context, Plan
from .procs import raise_nofile
from .report import Report

SCENARIOS: dict[str, tuple[str, Callable[[Context], None]]] = {
    "S1": (latency.SCENARIO, latency.run),
    "S2": (throughput.SCENARIO, throughput.run),
    "S3": (inflight.SCENARIO, inflight.run),
    "S4": (bodies.SCENARIO, bodies.run),
    "S5": (store_pause.SCENARIO, store_pause.run),
    "clients": (clients.SCENARIO, clients.run),
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "scenarios", nargs="*", metavar="SCENARIO", help=f"any of {', '.join(SCENARIOS)}; all"
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a few minutes")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx baseline")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--rev",
        help="measure proxy/ as of this git revision (git archive), not the working tree",
    )
    args = parser.parse_args(argv)
    chosen = [s.upper() if s.lower() != "clients" else "clients" for s in args.scenarios]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    if not wrk.available():
        parser.error("wrk is not installed (apt-get install wrk)")
    raise_nofile()
    env = environment.describe()
    env["proxy source"] = source.describe_working_tree()
    env["command"] = shlex.join(["python", "-m", "bench", *argv])
    env["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report = Report("apiyi-proxy benchmark", env)
    failed = []
    with tempfile.TemporaryDirectory(prefix="apiyi-bench-") as tmp:
        code = services.ROOT
        if args.rev:
            code, env["proxy source"] = source.extract(args.rev, Path(tmp) / "source")
        for name, value in env.items():
            print(f"{name}: {value}")
        ctx = Context(
            Plan.of(args.quick),
            report,
            Path(tmp),
            use_nginx=not args.no_nginx and environment.tool_version(["nginx"]) != "not installed",
            source=code,
        )
        for key in chosen or list(SCENARIOS):
            title, run = SCENARIOS[key]
            print(f"\n== {key}: {title}", flush=True)
            started = time.monotonic()
            try:
                run(ctx)
            except Exception:
                failed.append(key)
                report.note(title, "FAILED: " + traceback.format_exc(limit=3).replace("\n", " "))
            print(f"   ({time.monotonic() - started:.0f} s)", flush=True)
        if failed:
            kept = args.out / "failed-logs"
            ignore = shutil.ignore_patterns("*.json", "source")
            shutil.copytree(tmp, kept, dirs_exist_ok=True, ignore=ignore)
    print("\n" + report.markdown())
    print(f"saved {report.save(args.out)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
