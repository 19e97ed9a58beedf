"""Starting what a benchmark measures: the fake upstream, Redis, the proxy and nginx.

Placement on the two cores is fixed and reported: the system under test (the proxy, or
nginx as its baseline) on ``SUT_CPU``, everything else (load generator, fake upstream,
redis-server) on ``LOAD_CPU``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import Proc, children, free_port, http_ok, wait_until

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_KEY = "bench-upstream-key-0123456789abcdef"
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
PEPPER = "bench-pepper-0123456789abcdef0123456789"
SUT_CPU = 0
LOAD_CPU = 1
CLIENTS = ("aiohttp", "httpx", "httpx-aiohttp")


@dataclass(frozen=True)
class Endpoint:
    """Where a load generator sends requests, and which process to watch."""

    name: str
    base_url: str  # ends in /v1
    key: str
    pid: int  # the process whose RSS and CPU are measured


def source_env(source: Path) -> dict[str, str]:
    """Import ``proxy`` from ``source`` (a directory holding the package), ``bench`` from ROOT."""
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys((str(source), str(ROOT))))}


def start_fake(log_dir: Path, source: Path, latency: float = 0.0) -> tuple[Proc, str]:
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "fake-upstream", "--port", str(port)]
    argv += ["--api-key", UPSTREAM_KEY, "--latency", str(latency)]
    proc = Proc(f"fake-{port}", argv, log_dir, env=source_env(source), cpu=LOAD_CPU, cwd=source)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(url + "/v1/models"), 20, "fake upstream", proc)
    return proc, url


def reset_fake(url: str) -> None:
    request = urllib.request.Request(url + "/_fake/reset", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass


def fake_requests(url: str) -> int:
    with urllib.request.urlopen(url + "/_fake/billing", timeout=10) as response:
        return len(json.load(response)["requests"])


def start_redis(log_dir: Path) -> tuple[Proc, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    data_dir = log_dir / f"redis-{port}"
    data_dir.mkdir()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    argv += ["no", "--dir", str(data_dir), "--maxclients", "10000"]
    proc = Proc(f"redis-{port}", argv, log_dir, cpu=LOAD_CPU)

    def ping() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    wait_until(ping, 10, "redis-server", proc)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_proxy(
    log_dir: Path,
    upstream_url: str,
    *,
    source: Path = ROOT,
    store_url: str = "memory://",
    client: str = "aiohttp",
    access_log: bool = False,
    runner: str | None = None,
) -> tuple[Proc, Endpoint]:
    """``python -m proxy serve`` (or the bench harness for ``httpx-aiohttp``) on SUT_CPU."""
    port = free_port()
    env = {
        "APIYI_PROXY_CONFIG": "/dev/null",
        "APIYI_PROXY_UPSTREAM_URL": upstream_url + "/v1",
        "APIYI_API_KEY": UPSTREAM_KEY,
        "APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN,
        "APIYI_PROXY_KEY_PEPPER": PEPPER,
        "APIYI_PROXY_STORE_URL": store_url,
        "APIYI_PROXY_LOG__ACCESS_LOG": "true" if access_log else "false",
        "APIYI_PROXY_SERVER__GRACEFUL_TIMEOUT_SECONDS": "1",
        "APIYI_PROXY_UPSTREAM__CLIENT": "httpx" if client == "httpx-aiohttp" else client,
        **source_env(source),
    }
    module = runner or ("bench.httpx_aiohttp_serve" if client == "httpx-aiohttp" else "proxy")
    argv = [sys.executable, "-m", module, "serve", "--port", str(port)]
    proc = Proc(f"proxy-{port}", argv, log_dir, env=env, cpu=SUT_CPU, cwd=source)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(url + "/healthz"), 30, "proxy", proc)
    key = create_key(url)
    name = f"proxy ({store_url.partition(':')[0]}, {client})"
    return proc, Endpoint(name, url + "/v1", key, proc.pid)


def create_key(proxy_url: str) -> str:
    """A client key with budgets (so every request takes and settles a hold), no rpm cap."""
    made = new_key(proxy_url, {"name": "bench", "daily_usd": 1e6, "monthly_usd": 1e7})
    return str(made["key"])


def new_key(proxy_url: str, fields: dict[str, Any]) -> dict[str, Any]:
    """``POST /admin/keys`` with ``fields``: the created key, its secret included."""
    request = urllib.request.Request(
        proxy_url + "/admin/keys",
        data=json.dumps(fields).encode(),
        method="POST",
        headers={"authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        made: dict[str, Any] = json.load(response)
        return made


NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
user root root;
events {{ worker_connections 16000; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    upstream fake {{
        server 127.0.0.1:{upstream_port};
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 400s;
            proxy_send_timeout 400s;
        }}
    }}
}}
"""


def start_nginx(log_dir: Path, upstream_url: str) -> tuple[Proc, Endpoint] | None:
    """nginx ``proxy_pass`` with upstream keepalive, one worker on SUT_CPU; None if absent."""
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if binary is None:
        return None
    port = free_port()
    tmp = log_dir / f"nginx-{port}"
    tmp.mkdir()
    upstream_port = int(upstream_url.rpartition(":")[2])
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, upstream_port=upstream_port))
    argv = [binary, "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"]
    proc = Proc(f"nginx-{port}", argv, log_dir, cpu=SUT_CPU)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(url + "/v1/models"), 10, "nginx", proc)
    workers = children(proc.pid)
    return proc, Endpoint("nginx", url + "/v1", UPSTREAM_KEY, workers[0] if workers else proc.pid)


def direct(upstream_url: str, pid: int) -> Endpoint:
    return Endpoint("direct", upstream_url + "/v1", UPSTREAM_KEY, pid)
