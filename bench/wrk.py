"""Driving saturation and latency runs with wrk and a small Lua script."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import pinned
from .services import LOAD_CPU, Endpoint

GENERATION = {
    "model": "gpt-image-2-vip",
    "prompt": "a lighthouse at dawn",
    "size": "1280x1280",
    "response_format": "url",
}

SCRIPT = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: int  # socket errors, timeouts and non-2xx answers
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def available() -> bool:
    return shutil.which("wrk") is not None


def run(
    endpoint: Endpoint, connections: int, seconds: float, work_dir: Path, body: str | None = None
) -> WrkResult:
    script = work_dir / f"wrk-{endpoint.key[-6:]}.lua"
    payload = body if body is not None else json.dumps(GENERATION)
    script.write_text(SCRIPT.format(body=_lua_string(payload), key=endpoint.key))
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s"]
    argv += ["-s", str(script), endpoint.base_url + "/images/generations"]
    done = subprocess.run(
        pinned(argv, LOAD_CPU),
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH "):
            raw = json.loads(line[6:])
            errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
            return WrkResult(
                requests=raw["requests"],
                seconds=raw["duration_us"] / 1e6,
                errors=errors,
                p50_ms=raw["p50_us"] / 1000,
                p99_ms=raw["p99_us"] / 1000,
                max_ms=raw["max_us"] / 1000,
            )
    raise RuntimeError(f"wrk gave no result:\n{done.stdout}\n{done.stderr}")


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
