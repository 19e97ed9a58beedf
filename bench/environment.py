"""What machine and software a run measured, for the report's header."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

from . import services

PACKAGES = (
    "uvicorn", "uvloop", "httptools", "starlette", "aiohttp", "httpx", "httpx-aiohttp",
    "sniffio", "redis", "hiredis", "prometheus-client", "orjson",
)  # fmt: skip


def describe() -> dict[str, str]:
    info = {
        "nproc": str(os.cpu_count()),
        "CPU": _cpu_model(),
        "memory": _memory(),
        "kernel": platform.release(),
        "Python": sys.version.split()[0],
        "packages": ", ".join(f"{name} {_version(name)}" for name in PACKAGES),
        "nginx": tool_version(["nginx", "-v"]),
        "wrk": tool_version(["wrk", "-v"]),
        "redis-server": tool_version(["redis-server", "--version"]),
        "pinning": (
            f"proxy / nginx worker on CPU {services.SUT_CPU}; load generator, fake upstream "
            f"and redis-server on CPU {services.LOAD_CPU} (taskset)"
            if shutil.which("taskset")
            else "none (taskset missing)"
        ),
    }
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def tool_version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None and not os.path.exists(f"/usr/sbin/{argv[0]}"):
        return "not installed"
    binary = shutil.which(argv[0]) or f"/usr/sbin/{argv[0]}"
    try:
        done = subprocess.run(
            [binary, *argv[1:]], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return "not runnable"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0][:120] if text else "unknown"
