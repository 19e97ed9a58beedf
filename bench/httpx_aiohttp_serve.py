"""BENCH HARNESS ONLY: ``apiyi-proxy serve`` with httpx over the aiohttp transport.

``proxy/upstream.py`` offers two clients (``aiohttp``, ``httpx``). To measure a third,
httpx driven by the ``httpx-aiohttp`` package's ``AiohttpTransport``, this module swaps
the client factory that ``proxy.app`` calls and then runs the ordinary CLI. It is not a
supported way to run the proxy; BENCHMARKS.md gives the change ``proxy/upstream.py``
would need instead. Run as ``python -m bench.httpx_aiohttp_serve serve --port P``.
"""

from __future__ import annotations

import sys
from typing import Any

import proxy.app
from proxy import upstream
from proxy.cli import main
from proxy.config import UpstreamSettings


class HttpxAiohttpClient(upstream._HttpxClient):
    """The proxy's httpx client, with aiohttp doing the HTTP underneath."""

    def __init__(self, settings: UpstreamSettings) -> None:
        upstream.UpstreamClient.__init__(self, settings)
        import aiohttp
        import httpx
        from httpx_aiohttp import AiohttpTransport

        s = settings

        def session() -> Any:
            # Called on first request, inside the running loop.
            connector = aiohttp.TCPConnector(
                limit=s.max_connections, limit_per_host=0, keepalive_timeout=s.keepalive_seconds
            )
            return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

        limits = httpx.Limits(
            max_connections=s.max_connections,
            max_keepalive_connections=s.max_connections,
            keepalive_expiry=s.keepalive_seconds,
        )
        self._client = httpx.AsyncClient(
            transport=AiohttpTransport(limits=limits, client=session),
            limits=limits,
            timeout=httpx.Timeout(
                connect=s.connect_timeout, read=s.read_timeout, write=s.write_timeout, pool=30.0
            ),
            follow_redirects=False,
            trust_env=False,
        )


def open_upstream(settings: UpstreamSettings) -> upstream.UpstreamClient:
    return HttpxAiohttpClient(settings)


if __name__ == "__main__":
    # proxy.app looks the factory up by name when create_app runs.
    proxy.app.open_upstream = open_upstream  # type: ignore[attr-defined]
    sys.exit(main(sys.argv[1:]))
