"""Logs: one structured access line per request, and never a secret in any output."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from proxy.config import LogSettings
from proxy.logs import FLUSH_SECONDS, AccessLog

from .conftest import (
    ADMIN_TOKEN,
    PEPPER,
    ROOT,
    UPSTREAM_KEY,
    ProxyProcess,
    RedisServer,
    ThreadServer,
    process_env,
)

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def env_for(upstream: ThreadServer, **extra: str) -> dict[str, str]:
    logged = {
        "APIYI_PROXY_LOG__LEVEL": "debug",
        "APIYI_PROXY_LOG__FORMAT": "json",
        "APIYI_PROXY_UPSTREAM__READ_TIMEOUT": "1",
    }
    return process_env(upstream.url, **{**logged, **extra})


def access_lines(proxy: ProxyProcess) -> dict[str, dict[str, Any]]:
    """Access records by request id (the log lines are JSON objects)."""
    records = {}
    for line in proxy.output().splitlines():
        if not line.startswith("{"):
            continue  # the one-time banner of a memory store's first key
        entry = orjson.loads(line)
        if entry["logger"] == "apiyi_proxy.access":
            records[entry["request_id"]] = entry
    return records


def post(
    proxy: ProxyProcess, key: str, headers: dict[str, str] | None = None, **body: Any
) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/images/generations",
        json={"prompt": "a lighthouse", **body},
        headers={"authorization": f"Bearer {key}", **(headers or {})},
        timeout=30,
    )


def test_one_structured_access_line_per_request(
    upstream: ThreadServer, proxy_process: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_process(env_for(upstream))
    created = httpx.post(
        proxy.url + "/admin/keys", json={"name": "design-bot", "team": "design"}, headers=ADMIN
    ).json()
    ok = post(proxy, created["key"], size="2048 × 1152", quality="high", response_format="url")
    refused = post(proxy, created["key"], {"x-request-id": "client-trace-7"}, n=3)
    failed = post(proxy, created["key"], prompt="[fake:500] x")
    assert (ok.status_code, refused.status_code, failed.status_code) == (200, 400, 502)

    # The line is written once the answer is sent: wait for it.
    ids = {r.headers["x-request-id"] for r in (ok, refused, failed)}
    deadline = time.monotonic() + 10
    while not ids <= (lines := access_lines(proxy)).keys():
        assert time.monotonic() < deadline, "access lines missing"
        time.sleep(0.05)
    line = lines[ok.headers["x-request-id"]]
    assert line["route"] == "/v1/images/generations"
    assert (line["key_id"], line["key_name"], line["team"]) == (
        created["id"],
        "design-bot",
        "design",
    )
    assert (line["model"], line["size"], line["status"]) == ("gpt-image-2-vip", "2048x1152", 200)
    assert line["adjusted"] == ok.headers["x-proxy-adjusted"]
    assert line["upstream_status"] == 200
    assert line["cost_usd"] == line["held_usd"] == 0.03
    assert line["hold_outcome"] == "settled"
    assert 0 < line["upstream_ms"] <= line["total_ms"]

    line = lines[refused.headers["x-request-id"]]
    assert (line["status"], line["error_code"]) == (400, "n_not_supported")
    assert line["client_request_id"] == "client-trace-7"
    assert "client_request_id" not in lines[ok.headers["x-request-id"]]
    assert "hold" not in line and "upstream_status" not in line

    line = lines[failed.headers["x-request-id"]]
    assert (line["status"], line["upstream_status"]) == (502, 500)
    assert line["hold_outcome"] == "released" and "cost_usd" not in line


def test_no_secret_in_any_output(
    upstream: ThreadServer,
    proxy_process: Callable[..., ProxyProcess],
    redis_server: RedisServer,
) -> None:
    """Every path that fails or logs, at debug level: the secrets never show."""
    keys_mode = proxy_process(env_for(upstream, APIYI_PROXY_STORE_URL=redis_server.url))
    passthrough = proxy_process(env_for(upstream, APIYI_PROXY_AUTH_MODE="passthrough"))
    secrets = [UPSTREAM_KEY, ADMIN_TOKEN, PEPPER]

    created = httpx.post(proxy_url(keys_mode) + "/admin/keys", json={"name": "a"}, headers=ADMIN)
    key = created.json()["key"]
    wrong = "sk-" + "W" * 43
    secrets += [key, wrong]
    for prompt in ("x", "[fake:500] x", "[fake:timeout] x", "[fake:reset] x", "[fake:quota] x"):
        post(keys_mode, key, prompt=prompt, response_format="url")
    post(keys_mode, key, size="999x999")
    post(keys_mode, wrong)
    httpx.post(keys_mode.url + "/admin/keys", json={"name": "b"}, headers={"authorization": wrong})
    httpx.post(
        keys_mode.url + "/v1/images/generations",
        content=b"{not json" + key.encode(),
        headers={"authorization": f"Bearer {key}"},
    )
    # In passthrough mode the client's key is the upstream key: right and wrong.
    post(passthrough, UPSTREAM_KEY, response_format="url")
    post(passthrough, wrong)

    cli = subprocess.run(
        [sys.executable, "-m", "proxy", "keys", "list"],
        env={"APIYI_PROXY_STORE_URL": redis_server.url, "APIYI_PROXY_KEY_PEPPER": PEPPER,
             "APIYI_API_KEY": UPSTREAM_KEY, "PATH": "/usr/bin:/bin"},
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert created.json()["id"] in cli.stdout
    checked = cli.stdout + cli.stderr
    for proxy, calls in ((keys_mode, 11), (passthrough, 3)):
        proxy.stop()  # all of its output, to the last line
        assert len(access_lines(proxy)) == calls  # every call was logged (with /healthz)
        checked += proxy.output()
    assert "[fake:timeout]" not in checked  # prompts are not logged either
    for secret in secrets:
        assert secret not in checked
        assert secret[-12:] not in checked


def proxy_url(proxy: ProxyProcess) -> str:
    return proxy.url


def test_access_log_batches_lines_and_follows_level_and_switch() -> None:
    read_end, write_end = os.pipe()
    try:
        log = AccessLog(LogSettings(), fd=write_end)

        async def three_lines() -> None:
            for n in range(3):
                log.write({"request_id": f"req_{n}", "status": 200})
            await asyncio.sleep(FLUSH_SECONDS * 2)  # the timer writes the batch

        asyncio.run(three_lines())
        lines = os.read(read_end, 65536).decode().splitlines()
        entries = [orjson.loads(line) for line in lines]
        assert [e["request_id"] for e in entries] == ["req_0", "req_1", "req_2"]
        assert {e["logger"] for e in entries} == {"apiyi_proxy.access"}
        assert all(e["ts"].endswith("Z") and e["level"] == "info" for e in entries)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert not AccessLog(LogSettings(level="warning")).enabled
    assert not AccessLog(LogSettings(access_log=False)).enabled
