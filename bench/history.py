"""Spend history: how long ``GET /admin/usage`` takes over 400 days for 1,000 keys.

    python -m bench.history                       # 1,000 keys in 50 teams, 400 days
    python -m bench.history --keys 200 --days 60  # smaller

Starts a private redis-server and a proxy on it (``python -m proxy serve``), makes the
keys through the admin API, then writes their counters straight into Redis, dense: every
key, its team and its model spent on every day of the range (the worst case; real keys
are idle on most days, and idle days cost a read but no row). Each query is asked over
HTTP five times; the table gives the median and the slowest answer, the rows and the
bytes answered.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis

from . import environment
from .procs import Proc
from .services import ADMIN_TOKEN, new_key, start_fake, start_proxy, start_redis

MODELS = ("gpt-image-2-vip", "gpt-image-2-all")
RUNS = 5


def make_keys(proxy_url: str, keys: int, teams: int) -> list[tuple[str, str]]:
    """(key id, team) of ``keys`` new keys spread over ``teams`` teams."""
    made = []
    for i in range(keys):
        team = f"team-{i % teams:03d}"
        made.append((new_key(proxy_url, {"name": f"k{i}", "team": team})["id"], team))
    return made


def fill(store_url: str, keys: list[tuple[str, str]], days: list[str]) -> int:
    """Counters as the ledger books them: one image ($0.03) per key per day."""
    client = redis.Redis.from_url(store_url)
    months = sorted({day[:7] for day in days})
    written = 0
    pipe = client.pipeline(transaction=False)

    def put(group: str, scope: str, name: str, period: str, count: int) -> None:
        nonlocal written
        key = f"apiyi:{{t:{group}}}:u:{scope}:{name}:{period}"
        pipe.hset(key, mapping={"spent": 30_000 * count, "requests": count})
        written += 1
        if written % 20_000 == 0:
            pipe.execute()

    per_team: dict[str, int] = {}
    for key_id, team in keys:
        per_team[team] = per_team.get(team, 0) + 1
        for day in days:
            put(team, "key", key_id, day, 1)
        for month in months:
            put(team, "key", key_id, month, sum(d.startswith(month) for d in days))
    for team, members in per_team.items():
        for period in (*days, *months):
            count = members * (1 if len(period) == 10 else sum(d.startswith(period) for d in days))
            put(team, "team", team, period, count)
            put(team, "model", MODELS[0], period, count)
    pipe.execute()
    client.close()
    return written


def timed(url: str) -> tuple[float, float, int, int]:
    """Median and slowest seconds of RUNS answers, with their rows and bytes."""
    seconds: list[float] = []
    rows = size = 0
    for _ in range(RUNS):
        request = urllib.request.Request(url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            body = response.read()
        seconds.append(time.perf_counter() - started)
        size = len(body)
        if "format=csv" in url:
            rows = body.count(b"\n") - 1
        else:
            rows = len(json.loads(body)["rows"])
    return statistics.median(seconds), max(seconds), rows, size


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--teams", type=int, default=50)
    parser.add_argument("--days", type=int, default=400)
    args = parser.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="bench-history-"))
    procs: list[Proc] = []
    try:
        redis_proc, store_url = start_redis(log_dir)
        procs.append(redis_proc)
        fake, fake_url = start_fake(log_dir, Path.cwd())
        procs.append(fake)
        proxy, endpoint = start_proxy(log_dir, fake_url, store_url=store_url)
        procs.append(proxy)
        base = endpoint.base_url.removesuffix("/v1")
        keys = make_keys(base, args.keys, args.teams)
        last = datetime.now(UTC).date()
        days = [(last - timedelta(days=i)).isoformat() for i in range(args.days - 1, -1, -1)]
        started = time.perf_counter()
        written = fill(store_url, keys, days)
        print(f"{len(keys)} keys in {args.teams} teams, {len(days)} days: "
              f"{written:,} counters written in {time.perf_counter() - started:.1f} s")  # fmt: skip

        queries = [
            ("team", "month", "json"),
            ("team", "day", "json"),
            ("model", "day", "json"),
            ("key", "month", "json"),
            ("key", "day", "json"),
            ("key", "day", "csv"),
        ]
        print()
        print("| by | period | format | rows | bytes | median s | slowest s |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
        for by, period, form in queries:
            params = {"from": days[0], "to": days[-1], "by": by, "period": period, "format": form}
            url = base + "/admin/usage?" + urllib.parse.urlencode(params)
            median, slowest, rows, size = timed(url)
            print(
                f"| {by} | {period} | {form} | {rows:,} | {size:,} | {median:.3f} | {slowest:.3f} |"
            )
        print()
        for name, value in environment.describe().items():
            print(f"- {name}: {value}")
    finally:
        for proc in reversed(procs):
            proc.stop()


if __name__ == "__main__":
    main()
