"""``create_app(settings)``: builds everything; the lifespan opens and closes it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from .account import AccountPoller
from .admin import Admin, error_response, json_response
from .alerts import Alerts
from .auth import Authenticator, bears
from .config import Settings
from .console import Console
from .errors import MethodNotAllowed, NotFound, StoreUnavailable, Unauthorized
from .exchange import ExchangeMiddleware, exchange_of
from .idempotency import Idempotency
from .images import ImagesEndpoint, Services
from .keys import KeyHasher
from .ledger import Ledger
from .logs import AccessLog
from .metrics import Metrics
from .openapi import DOCS_CSP, DOCS_CSS_PATH, docs_page
from .policy import RequestPolicy
from .request_log import RequestLog
from .results import open_results
from .store import Store, StoreError, open_store
from .upstream import UpstreamClient, open_upstream

log = logging.getLogger("apiyi_proxy")
FAKE_UPSTREAM_MOUNT = "/_fake_upstream"
STORE_OPEN_SECONDS = 10.0


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    upstream: UpstreamClient | None = None,
    metrics: Metrics | None = None,
    on_ready: Callable[[Services], Awaitable[None]] | None = None,
) -> ASGIApp:
    metrics = metrics or Metrics()
    store = store or open_store(settings.store)
    upstream = upstream or open_upstream(settings.upstream)
    ledger = Ledger(store, settings, metrics)
    alerts = Alerts(settings.alerts, ledger, metrics)
    if alerts.enabled:
        ledger.on_spend = alerts.spent
    account = AccountPoller(settings, upstream, ledger, metrics)
    hasher = KeyHasher(settings.auth.key_pepper)
    invalidations = store.invalidations()
    auth = Authenticator(settings, ledger, hasher, invalidations)
    results = open_results(settings.store)
    idempotency = Idempotency(settings, ledger, results, metrics)
    services = Services(
        settings,
        RequestPolicy(settings.policy),
        auth,
        ledger,
        upstream,
        metrics,
        hasher,
        idempotency,
    )
    admin = Admin(settings, ledger, auth, hasher)
    console = Console(settings, admin, ledger, metrics)
    generations = ImagesEndpoint(services, "generations")
    edits = ImagesEndpoint(services, "edits")
    catalog = _model_catalog(settings)
    model_list = {"object": "list", "data": list(catalog.values())}
    image_routes: dict[str, ASGIApp] = {
        "/v1/images/generations": generations,
        "/images/generations": generations,
        "/v1/images/edits": edits,
        "/images/edits": edits,
    }
    access_log = AccessLog(settings.log)
    request_log = RequestLog(store, settings.store, metrics)

    async def models(request: Request) -> Response:
        exchange_of(request.scope).route = "/v1/models"
        return json_response(model_list)

    async def model(request: Request) -> Response:
        exchange_of(request.scope).route = "/v1/models/{id}"
        model_id: str = request.path_params["model_id"]
        entry = catalog.get(model_id)
        if entry is None:
            choices = ", ".join(catalog)
            return error_response(
                NotFound(
                    f"The model {model_id[:64]!r} does not exist here; use one of: {choices}.",
                    param="model",
                    code="model_not_found",
                )
            )
        return json_response(entry)

    async def healthz(request: Request) -> Response:
        exchange_of(request.scope).route = "/healthz"
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        exchange_of(request.scope).route = "/readyz"
        try:
            await ledger.call("ping", store.ping)
        except StoreUnavailable as error:
            return error_response(error)
        return json_response({"status": "ready"})

    metrics_token = settings.auth.metrics_token

    async def metrics_endpoint(request: Request) -> Response:
        exchange_of(request.scope).route = "/metrics"
        if metrics_token and not bears(request.headers, metrics_token):
            return error_response(
                Unauthorized("/metrics needs the metrics token.", code="invalid_metrics_token")
            )
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    docs = docs_page(settings)
    docs_headers = {
        "content-security-policy": DOCS_CSP,
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
    }

    async def openapi_json(request: Request) -> Response:
        exchange_of(request.scope).route = "/openapi.json"
        return Response(docs.json, media_type="application/json")

    async def docs_html(request: Request) -> Response:
        exchange_of(request.scope).route = "/docs"
        return Response(docs.html, media_type="text/html", headers=docs_headers)

    async def docs_css(request: Request) -> Response:
        exchange_of(request.scope).route = "/docs"
        return Response(docs.css, media_type="text/css", headers=docs_headers)

    routes: list[Any] = [
        # Reached only by other methods (a 405): ImageRoutes takes the POSTs first.
        *(Route(path, endpoint, methods=["POST"]) for path, endpoint in image_routes.items()),
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", model, methods=["GET"]),
        Route("/models/{model_id:path}", model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs_html, methods=["GET"]),
        Route(DOCS_CSS_PATH, docs_css, methods=["GET"]),
        *admin.routes(),
        *console.routes(),
    ]
    if settings.server.metrics_port is None:
        routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(STORE_OPEN_SECONDS):
                await store.open()
        except (StoreError, TimeoutError):
            log.warning("store not reachable at start-up; /readyz reports it until it is")
        # Seeds only: a team changed through the admin API keeps its change across a
        # restart. If the store is away, the ledger's refresh seeds them once it is back.
        with contextlib.suppress(StoreUnavailable):
            await ledger.seed_teams()
        ledger.start()
        alerts.start()
        request_log.start()
        await account.start()
        if invalidations is not None:
            invalidations.start(auth, metrics.key_change_subscription_losses.inc)
        if on_ready is not None:
            await on_ready(services)
        try:
            yield
        finally:
            await account.stop()
            await ledger.stop()
            await alerts.stop()
            await request_log.stop()
            if invalidations is not None:
                await invalidations.stop()
            await upstream.close()
            await results.close()
            await store.close()
            access_log.flush()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: _not_found, 405: _not_allowed},
    )
    app.state.services = services
    # A path with a trailing slash is answered as the route itself (ImageRoutes): the
    # router's redirect would build its Location from the client's Host header.
    app.router.redirect_slashes = False
    proxy = ExchangeMiddleware(ImageRoutes(app, image_routes), metrics, access_log, request_log)
    if settings.server.fake_upstream:
        from .fake_upstream import FakeUpstream, create_fake_app

        # It bills at the proxy's prices, so that its account agrees with the ledger.
        prices = {m.name: m.price_usd for m in settings.policy.models}
        return BesideTheFake(proxy, create_fake_app(FakeUpstream(api_key=None, prices=prices)))
    return proxy


class BesideTheFake:
    """The proxy, with the built-in fake upstream at ``FAKE_UPSTREAM_MOUNT`` on its port.

    The fake's calls are the upstream's, not the proxy's: they reach it before the
    proxy's middleware, so they appear in neither its metrics nor its access log.
    """

    def __init__(self, proxy: ASGIApp, fake: ASGIApp) -> None:
        self.proxy = proxy
        self.fake = Router(routes=[Mount(FAKE_UPSTREAM_MOUNT, fake)])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(FAKE_UPSTREAM_MOUNT + "/"):
            await self.fake(scope, receive, send)
            return
        await self.proxy(scope, receive, send)


class ImageRoutes:
    """POSTs to the image routes go straight to their endpoints.

    They are plain ASGI apps that answer their own errors, so the router and the
    exception middlewares in front of every other route would only cost time on
    the request path. Everything else, the lifespan included, goes to ``app``.
    A trailing slash is dropped first, so ``/v1/models/`` is ``/v1/models``.
    """

    def __init__(self, app: ASGIApp, endpoints: dict[str, ASGIApp]) -> None:
        self.app = app
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.endpoints.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _model_catalog(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every model id a client may name, in OpenAI's shape: the served models, then the
    aliases, each showing the model it maps to."""
    created = int(time.time())
    catalog: dict[str, dict[str, Any]] = {
        m.name: {"id": m.name, "object": "model", "created": created, "owned_by": "apiyi-proxy"}
        for m in settings.policy.models
    }
    for alias, target in settings.policy.model_aliases.items():
        catalog.setdefault(
            alias,
            {
                "id": alias,
                "object": "model",
                "created": created,
                "owned_by": "apiyi-proxy",
                "alias_of": target,
            },
        )
    return catalog


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(NotFound(f"Unknown route {request.method} {request.url.path[:100]}."))


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(MethodNotAllowed(f"Method {request.method} is not allowed here."))
