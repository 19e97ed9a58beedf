"""One request's story, and the ASGI middleware that opens and closes it.

``ExchangeMiddleware`` gives every request an ``x-request-id`` of the proxy's own (a
client's ``x-request-id``, if sane, comes back beside it as ``x-client-request-id`` and
is logged with it, but never replaces it: two clients may choose the same one), an
``Exchange`` the
handlers fill in (key, model, cost, upstream timing), turns any unexpected exception
into an OpenAI-shaped 500 (never a traceback or a secret), then records the metrics
and writes one structured access-log line.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ProxyError
from .http import send_bytes
from .logs import AccessLog
from .metrics import Metrics, status_class
from .request_log import RequestLog
from .store import RequestRecord

log = logging.getLogger("apiyi_proxy.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass(slots=True)  # one per request in flight: no per-instance dict
class Exchange:
    request_id: str
    method: str
    client_request_id: str | None = None
    started: float = field(default_factory=time.perf_counter)
    route: str = "other"
    model: str = "-"
    key_id: str | None = None
    key_name: str | None = None
    team: str | None = None
    size: str | None = None
    adjusted: str | None = None
    status: int = 0
    error_code: str | None = None
    upstream_status: int | None = None
    upstream_seconds: float = 0.0
    images_billed: int = 0
    images_returned: int = 0
    cost_micros: int = 0
    uncertain_micros: int = 0
    hold: str | None = None
    held_micros: int = 0
    hold_outcome: str | None = None  # settled, released or uncertain
    key_forgotten: bool = False  # a refused passthrough key: its call leaves no record
    replay: str | None = None

    def access_record(self, total: float) -> dict[str, Any]:
        record: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "total_ms": round(total * 1000, 3),
        }
        optional = {
            "client_request_id": self.client_request_id,
            "model": None if self.model == "-" else self.model,
            "key_id": self.key_id,
            "key_name": self.key_name,
            "team": self.team,
            "size": self.size,
            "adjusted": self.adjusted,
            "error_code": self.error_code,
            "upstream_status": self.upstream_status,
            "upstream_ms": round(self.upstream_seconds * 1000, 3)
            if self.upstream_seconds
            else None,
            "images_billed": self.images_billed or None,
            "images_returned": self.images_returned or None,
            "cost_usd": self.cost_micros / 1e6 if self.cost_micros else None,
            "uncertain_usd": self.uncertain_micros / 1e6 if self.uncertain_micros else None,
            "hold": self.hold,
            "held_usd": self.held_micros / 1e6 if self.held_micros else None,
            "hold_outcome": self.hold_outcome,
            "replay": self.replay,
        }
        record.update({k: v for k, v in optional.items() if v is not None})
        return record

    def request_record(self) -> RequestRecord | None:
        """The call as the per-request log keeps it; None unless it held money."""
        if self.hold_outcome is None or self.key_id is None or self.key_forgotten:
            return None
        return RequestRecord(
            time=time.time(),
            request_id=self.request_id,
            key_id=self.key_id,
            team=self.team,
            model=self.model,
            size=self.size,
            images=self.images_billed,
            cost_micros=self.cost_micros,
            outcome=self.hold_outcome,
        )


def exchange_of(scope: Scope) -> Exchange:
    exchange: Exchange = scope["state"]["exchange"]
    return exchange


class ExchangeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        access_log: AccessLog,
        request_log: RequestLog | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.request_log = request_log
        self._ids = random.Random()  # request ids need to be unique, not unpredictable

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req_{self._ids.getrandbits(96):024x}"
        client_id = _client_request_id(scope)
        exchange = Exchange(request_id, scope["method"], client_id)
        scope.setdefault("state", {})["exchange"] = exchange
        id_headers = [(b"x-request-id", request_id.encode())]
        if client_id is not None:
            id_headers.append((b"x-client-request-id", client_id.encode()))
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                exchange.status = message["status"]
                message["headers"] = [*message.get("headers", []), *id_headers]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            if not started:
                error = ProxyError(
                    "The proxy failed to handle this request.", code="internal_error"
                )
                await send_bytes(send_with_id, 500, error.body(), error.headers())
        finally:
            self._record(exchange)

    def _record(self, ex: Exchange) -> None:
        total = time.perf_counter() - ex.started
        status = status_class(ex.status) if ex.status else "499"
        self.metrics.requests.labels(ex.route, ex.model, status).inc()
        self.metrics.request_seconds.labels(ex.route, ex.model, status).observe(total)
        if ex.upstream_seconds:
            self.metrics.overhead_seconds.labels(ex.route).observe(
                max(0.0, total - ex.upstream_seconds)
            )
        if self.access_log.enabled:
            self.access_log.write(ex.access_record(total))
        if self.request_log is not None and self.request_log.enabled:
            record = ex.request_record()
            if record is not None:
                self.request_log.add(record)


def _client_request_id(scope: Scope) -> str | None:
    """The client's own request id, if it sent a sane one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
    return None
