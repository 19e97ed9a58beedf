"""Running the proxy under uvicorn: one process, or several workers sharing a store.

The listening socket is bound here, before uvicorn starts and before the app's lifespan
runs: an address that cannot be had ends the command with one line and nothing else,
and what start-up announces (its settings, a first key) is announced for a port that
is already ours. The socket is then handed to uvicorn, or shared by its workers.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import replace
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from prometheus_client import CollectorRegistry, start_http_server
from uvicorn.supervisors import Multiprocess

from . import __version__, logs
from . import config as config_module
from .app import FAKE_UPSTREAM_MOUNT, create_app
from .config import Settings
from .edge import Edge, EdgeProtocol
from .images import Services
from .keys import issue_key
from .metrics import Metrics, multiprocess_collector

log = logging.getLogger("apiyi_proxy")
FAKE_UPSTREAM_KEY = "fake-upstream-key"
AUTH_MODES = {
    "keys": "keys (clients send keys this proxy issues)",
    "passthrough": "passthrough (clients send their own upstream key)",
}
N_POLICIES = {
    "reject": "reject (n > 1 is refused: the upstream bills n images and returns one)",
    "strip": "strip (n > 1 becomes one image)",
    "fanout": "fanout (n > 1 becomes n upstream calls)",
}


class CannotListen(Exception):
    """An address the proxy cannot listen on; the message names it and why, in one line."""


def with_fake_upstream(settings: Settings) -> Settings:
    """Point the upstream at the fake mounted in this same server."""
    base = f"http://127.0.0.1:{settings.server.port}{FAKE_UPSTREAM_MOUNT}/v1"
    upstream = replace(
        settings.upstream, base_url=base, api_key=settings.upstream.api_key or FAKE_UPSTREAM_KEY
    )
    return replace(settings, upstream=upstream)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    s = settings.server
    return {
        "host": s.host,
        "port": s.port,
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        # httptools within the edge's limits (proxy/edge.py); the proxy serves no websockets.
        "http": functools.partial(EdgeProtocol, edge=Edge(s)),
        "ws": "none",
        "timeout_keep_alive": s.keepalive_timeout_seconds,
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        "proxy_headers": False,
        "backlog": s.backlog,
        "limit_concurrency": s.limit_concurrency,
        "timeout_graceful_shutdown": s.graceful_timeout_seconds,
        "log_config": None,
    }


def serve(settings: Settings, config_path: str | None = None) -> None:
    logs.setup(settings.log)
    if settings.store.replays_local:
        # Said once, here: a duplicate on another replica or worker would get a 409.
        log.warning(
            "replay bodies are kept per process (store.results_url memory://) while the "
            "ledger is shared: an idempotent duplicate reaching another replica or worker "
            "cannot be replayed and gets a 409; leave store.results_url unset to keep "
            "them beside the ledger, or point it at a Redis"
        )
    config_module.check_serving(settings)
    if settings.server.fake_upstream:
        settings = with_fake_upstream(settings)
    server = settings.server
    sock = listen(server.host, server.port, server.backlog)
    try:
        if settings.server.workers > 1:
            _serve_workers(settings, sock, config_path)
        else:
            _serve_one(settings, sock)
    finally:
        sock.close()


def _serve_one(settings: Settings, sock: socket.socket) -> None:
    metrics = Metrics()
    if settings.server.metrics_port is not None:
        _metrics_server(settings, metrics.collector())
    _announce(settings)
    first_key = settings.auth.mode == "keys" and not settings.store.shared
    app = create_app(settings, metrics=metrics, on_ready=_first_key if first_key else None)
    # uvicorn drains in-flight calls on SIGTERM, then raises the signal again; by then
    # the shutdown was clean, so end with status 0 rather than die by the signal.
    signal.signal(signal.SIGTERM, _drained)
    uvicorn.Server(uvicorn.Config(app, **uvicorn_options(settings))).run(sockets=[sock])


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """A socket bound to the address and listening, as uvicorn's ``Config.bind_socket``
    makes one (and inheritable, for workers); ``CannotListen`` if the address is not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise CannotListen(f"cannot listen on {_address(host, port)}: {_why(exc)}") from None
    sock.set_inheritable(True)
    return sock


def _why(exc: OSError) -> str:
    reason = (exc.strerror or str(exc)).lower()
    if exc.errno == errno.EADDRINUSE:
        return f"{reason} (another program has this port; choose another with --port)"
    if exc.errno == errno.EACCES:
        return f"{reason} (ports below 1024 need privileges; choose another with --port)"
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return f"{reason} (not an address of this machine; check --host)"
    return reason


def _metrics_server(settings: Settings, registry: CollectorRegistry) -> None:
    host, port = settings.server.host, settings.server.metrics_port
    assert port is not None
    try:
        start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise CannotListen(
            f"cannot serve metrics on {_address(host, port)} (server.metrics_port): {_why(exc)}"
        ) from None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _client_url(settings: Settings) -> str:
    """Where a client on this machine reaches the proxy."""
    host = settings.server.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{_address(host, settings.server.port)}"


def startup_lines(settings: Settings) -> list[str]:
    """What start-up says, one line per setting (SPEC 9); no secret in any of them."""
    server = settings.server
    workers = f"{server.workers} workers" if server.workers > 1 else "1 process"
    store = store_address(settings.store.url)
    if not settings.store.shared:
        store += " (inside this process: keys and spend end with it)"
    if settings.auth.admin_token:
        admin = f"on at {_client_url(settings)}/admin (admin token set)"
    else:
        admin = "off (set APIYI_PROXY_ADMIN_TOKEN to turn it on)"
    upstream = urlsplit(settings.upstream.base_url)
    host = f"{upstream.scheme}://{upstream.hostname or ''}"
    if upstream.port:
        host += f":{upstream.port}"
    if server.fake_upstream:
        host += " (the built-in fake upstream: no network, nothing billed)"
    lines = [
        f"apiyi-proxy {__version__}",
        f"  listening  http://{_address(server.host, server.port)} ({workers})",
        f"  store      {store}",
        f"  auth       {AUTH_MODES[settings.auth.mode]}",
        f"  admin API  {admin}",
        f"  upstream   {host}",
        f"  n policy   {N_POLICIES[settings.policy.n]}",
    ]
    if settings.auth.mode == "keys" and settings.store.shared:
        lines.append(f"  keys       make one with {more_keys(settings)}")
    return lines


def store_address(url: str) -> str:
    """The store URL without its password or options (they may hold secrets)."""
    parts = urlsplit(url)
    user, at, hosts = parts.netloc.rpartition("@")
    if at:
        name, colon, _ = user.partition(":")
        hosts = f"{name}{':***' if colon else ''}@{hosts}"
    return f"{parts.scheme}://{hosts}{parts.path}"


def more_keys(settings: Settings) -> str:
    """How to make client keys, for this configuration."""
    url = _client_url(settings)
    through_api = f"apiyi-proxy keys create --name NAME --url {url}"
    if settings.auth.admin_token:
        how = f"{through_api} (with APIYI_PROXY_ADMIN_TOKEN set to this proxy's admin token)"
        if settings.store.shared:
            how += ", or without --url beside this proxy's store settings"
        return how
    if settings.store.shared:
        return (
            "apiyi-proxy keys create --name NAME, with this proxy's store settings "
            "(APIYI_PROXY_STORE_URL, APIYI_PROXY_KEY_PEPPER)"
        )
    return (
        "set APIYI_PROXY_ADMIN_TOKEN (32 characters or more: openssl rand -hex 32), "
        f"restart, then {through_api}"
    )


def _announce(settings: Settings) -> None:
    print("\n".join(startup_lines(settings)), file=sys.stderr, flush=True)


def _drained(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


async def _first_key(services: Services) -> None:
    """Make the embedded store's first key, so the README's SDK example runs at once."""
    store = services.ledger.store
    if await store.keys():
        return
    secret, record = issue_key(services.hasher, "first key")
    await store.add_key(record)
    settings = services.settings
    print(
        "\nNo client keys yet: made one for you (kept in memory, shown this once):\n\n"
        f"    export OPENAI_API_KEY={secret}\n"
        f"    export OPENAI_BASE_URL={_client_url(settings)}/v1\n\n"
        f"More keys: {more_keys(settings)}\n",
        file=sys.stderr,
        flush=True,
    )


def _serve_workers(settings: Settings, sock: socket.socket, config_path: str | None) -> None:
    # Each worker imports the app afresh and loads its settings from the environment:
    # hand it the config file and what the command line set.
    os.environ.update(config_module.worker_environment(settings, config_path))
    directory = tempfile.mkdtemp(prefix="apiyi-proxy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        if settings.server.metrics_port is not None:
            _metrics_server(settings, multiprocess_collector(directory))
        _announce(settings)
        config = uvicorn.Config(
            "proxy.server:worker_app",
            factory=True,
            workers=settings.server.workers,
            **uvicorn_options(settings),
        )
        # The workers share the socket bound above, as uvicorn.run would have them do.
        Multiprocess(config, sockets=[sock]).run()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def worker_app() -> Any:
    settings = config_module.load()
    logs.setup(settings.log)
    if settings.server.fake_upstream:
        settings = with_fake_upstream(settings)
    return create_app(settings)
