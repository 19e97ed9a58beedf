"""Profile the proxy under S2 load: ``python -m bench.profile [--store redis|memory]``.

Starts the fake upstream, a private redis-server and the proxy as ``python -m bench``
does, drives it with wrk at 64 connections, records it with ``py-spy record`` (raw folded
stacks) and prints the hottest frames: self time overall, and inclusive time of the
proxy's own functions (``proxy/*.py``). Needs ``pip install py-spy``.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import services, source, wrk
from .context import Context, Plan
from .report import Report

_LINE = re.compile(r":\d+\)")


def summarize(folded: Path, top: int) -> str:
    """Self and inclusive shares of a py-spy raw (folded) profile."""
    total = 0
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "self time (leaf frames):"]
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in own.most_common(top)]
    lines += ["", "inclusive time, proxy/ functions:"]
    ours = [(k, v) for k, v in inclusive.items() if "(proxy/" in k and "__main__" not in k]
    ours.sort(key=lambda kv: -kv[1])
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in ours[:top]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--store", choices=("redis", "memory"), default="redis")
    parser.add_argument("--client", default="aiohttp")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rev", help="profile proxy/ as of this git revision")
    args = parser.parse_args(argv)
    if shutil.which("py-spy") is None:
        parser.error("py-spy is not installed (pip install py-spy)")
    args.out.mkdir(parents=True, exist_ok=True)
    folded = args.out / f"profile-{args.store}-{args.client}.txt"
    with tempfile.TemporaryDirectory(prefix="apiyi-profile-") as tmp:
        code, label = services.ROOT, source.describe_working_tree()
        if args.rev:
            code, label = source.extract(args.rev, Path(tmp) / "source")
        print(f"proxy source: {label}")
        ctx = Context(Plan.of(True), Report("profile", {}), Path(tmp), use_nginx=False, source=code)
        with ctx.scope() as scope:
            _, fake_url = scope.fake()
            _, redis_url = scope.redis()
            store = redis_url if args.store == "redis" else "memory://"
            with scope.proxy(fake_url, store_url=store, client=args.client) as proxy:
                wrk.run(proxy, 64, 2, ctx.work_dir)  # warm-up
                command = ["py-spy", "record", "--pid", str(proxy.pid), "--nonblocking"]
                command += ["--duration", str(args.seconds), "--rate", str(args.rate)]
                command += ["--format", "raw", "--output", str(folded)]
                spy = subprocess.Popen(
                    command,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    result = wrk.run(proxy, 64, args.seconds + 1, ctx.work_dir)
                    spy.wait(args.seconds + 30)
                finally:
                    if spy.poll() is None:
                        spy.kill()
                        spy.wait(10)
    print(
        f"{args.store} store, {args.client}: {result.rps:,.0f} req/s under the profiler, "
        f"{result.errors} errors; folded stacks in {folded}\n"
    )
    print(summarize(folded, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
