"""Running the proxy under uvicorn: one process, or several workers sharing a store."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import replace
from types import FrameType
from typing import Any

import uvicorn
from prometheus_client import start_http_server

from . import config as config_module
from . import logs
from .app import FAKE_UPSTREAM_MOUNT, create_app
from .config import Settings
from .edge import Edge, EdgeProtocol
from .images import Services
from .keys import issue_key
from .metrics import Metrics, multiprocess_collector

log = logging.getLogger("apiyi_proxy")
FAKE_UPSTREAM_KEY = "fake-upstream-key"


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
    if settings.server.workers > 1:
        _serve_workers(settings, config_path)
        return
    metrics = Metrics()
    if settings.server.metrics_port is not None:
        start_http_server(
            settings.server.metrics_port, settings.server.host, registry=metrics.collector()
        )
    first_key = settings.auth.mode == "keys" and settings.store.url.startswith("memory")
    app = create_app(settings, metrics=metrics, on_ready=_first_key if first_key else None)
    # uvicorn drains in-flight calls on SIGTERM, then raises the signal again; by then
    # the shutdown was clean, so end with status 0 rather than die by the signal.
    signal.signal(signal.SIGTERM, _drained)
    uvicorn.Server(uvicorn.Config(app, **uvicorn_options(settings))).run()


def _drained(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


async def _first_key(services: Services) -> None:
    """Make the embedded store's first key, so the README's SDK example runs at once."""
    store = services.ledger.store
    if await store.keys():
        return
    secret, record = issue_key(services.hasher, "first key")
    await store.add_key(record)
    server = services.settings.server
    url = f"http://{server.host}:{server.port}/v1"
    print(
        f"\nNo client keys yet: made one for you (kept in memory, shown this once):\n\n"
        f"    export OPENAI_API_KEY={secret}\n    export OPENAI_BASE_URL={url}\n\n"
        "More keys: POST /admin/keys with APIYI_PROXY_ADMIN_TOKEN set, or a redis:// store "
        "and `apiyi-proxy keys create`.\n",
        file=sys.stderr,
        flush=True,
    )


def _serve_workers(settings: Settings, config_path: str | None) -> None:
    # Each worker imports the app afresh and loads its settings from the environment:
    # hand it the config file and what the command line set.
    os.environ.update(config_module.worker_environment(settings, config_path))
    directory = tempfile.mkdtemp(prefix="apiyi-proxy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    if settings.server.metrics_port is not None:
        workers = multiprocess_collector(directory)
        start_http_server(settings.server.metrics_port, settings.server.host, registry=workers)
    try:
        uvicorn.run(
            "proxy.server:worker_app",
            factory=True,
            workers=settings.server.workers,
            **uvicorn_options(settings),
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def worker_app() -> Any:
    settings = config_module.load()
    logs.setup(settings.log)
    if settings.server.fake_upstream:
        settings = with_fake_upstream(settings)
    return create_app(settings)
