"""The upstream call and its answer: one call, or ``n`` in parallel (fanout).

Each path resolves the hold exactly once: released when the upstream certainly did
not bill (unreachable, a 4xx/5xx answer, a 200 that carries an error), kept as spend
when an image was produced, kept as *uncertain* spend when the call may have been
billed but we cannot know (timeouts, lost connections). The last response byte is
sent only after the ledger has the outcome, so a client's next call never races it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.types import Send

from .auth import Caller
from .config import Settings
from .errors import ProxyError, UpstreamFailed, UpstreamTimeout
from .exchange import Exchange
from .ledger import Hold
from .metrics import Metrics
from .policy import Decision
from .results import Capture
from .rewrite import ImagesBodyRewriter, UpstreamBodyError
from .upstream import TransportError, UpstreamClient, UpstreamResponse
from .upstream_errors import upstream_error

ERROR_BODY_LIMIT = 64 * 1024
HOLD_BYTES = 64 * 1024
Body = tuple[bytes | AsyncIterator[bytes], dict[str, str]]
BodyFactory = Callable[[], Body]


class Responder:
    """Sends one 200 answer, copying it to a capture for replay if asked.

    Up to ``hold_bytes`` of body are held back: an answer that ends within them (a
    URL, a small image) leaves in one write with a ``content-length``, and one that
    fails within them can still be answered with an error. Past them it streams.
    """

    def __init__(
        self,
        send: Send,
        headers: list[tuple[bytes, bytes]],
        capture: Capture | None,
        hold_bytes: int = HOLD_BYTES,
    ) -> None:
        self._send = send
        self.headers = headers
        self._capture = capture
        self._hold_bytes = hold_bytes
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.started = False

    async def body(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._capture is not None:
            self._capture.write(chunk)
        if self.started:
            await self._send({"type": "http.response.body", "body": chunk, "more_body": True})
            return
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        if self._pending_size > self._hold_bytes:
            self.started = True
            await self._send(
                {"type": "http.response.start", "status": 200, "headers": self.headers}
            )
            await self._send(
                {"type": "http.response.body", "body": self._take(), "more_body": True}
            )

    async def finish(self, chunk: bytes) -> None:
        if self._capture is not None and chunk:
            self._capture.write(chunk)
        if not self.started:
            self.started = True
            body = self._take() + chunk
            length = (b"content-length", str(len(body)).encode())
            await self._send(
                {"type": "http.response.start", "status": 200, "headers": [*self.headers, length]}
            )
            await self._send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await self._send({"type": "http.response.body", "body": chunk, "more_body": False})

    def _take(self) -> bytes:
        body = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        return body


@dataclass(slots=True)
class Call:
    """One proxied request on its way upstream."""

    exchange: Exchange
    caller: Caller
    decision: Decision
    body: BodyFactory
    hold: Hold
    price: int
    capture: Capture | None


class Forwarder:
    def __init__(
        self, settings: Settings, upstream: UpstreamClient, metrics: Metrics, path: str
    ) -> None:
        self._settings = settings
        self._upstream = upstream
        self._metrics = metrics
        self._path = path
        self._strip = settings.policy.b64_prefix == "strip"
        self._secrets = tuple(
            x for x in (settings.upstream.api_key, settings.upstream.base_url) if x
        )

    async def _post(self, call: Call) -> UpstreamResponse:
        content, content_headers = call.body()
        key = call.caller.upstream_key or self._settings.upstream.api_key
        headers = {
            "authorization": f"Bearer {key}",
            "accept": "application/json",
            "user-agent": "apiyi-proxy",
            **content_headers,
        }
        return await self._upstream.post(self._path, headers, content)

    def _error(self, call: Call, response: UpstreamResponse, raw: bytes) -> ProxyError:
        return upstream_error(
            response.status,
            raw,
            dict(response.headers),
            passthrough=call.caller.upstream_key is not None,
            secrets=self._secrets,
        )

    def _headers(self, adjusted: str | None) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if adjusted:
            headers.append((b"x-proxy-adjusted", adjusted.encode()))
        return headers

    # one call ------------------------------------------------------------------------
    async def single(self, call: Call, send: Send) -> None:
        ex, hold = call.exchange, call.hold
        started = time.perf_counter()
        outcome = "ok"
        try:
            try:
                response = await self._post(call)
            except TransportError as exc:
                outcome = "timeout" if exc.timeout else "transport"
                raise await _transport_failed(ex, hold, exc) from None
            ex.upstream_status = response.status
            try:
                if response.status != 200:
                    # refused: the upstream said no to this request (moderation, quota,
                    # a bad key); error: it failed to serve it.
                    outcome = "refused" if response.status < 500 else "error"
                    raw = await _read_error(response)
                    await hold.release()
                    raise self._error(call, response, raw)
                outcome = await self._stream_one(call, response, send)
            finally:
                await response.close()
        finally:
            ex.upstream_seconds = time.perf_counter() - started
            model = call.decision.model
            self._metrics.upstream_seconds.labels(model, outcome).observe(ex.upstream_seconds)

    async def _stream_one(self, call: Call, response: UpstreamResponse, send: Send) -> str:
        ex, hold = call.exchange, call.hold
        responder = Responder(send, self._headers(ex.adjusted), call.capture)
        rewriter = ImagesBodyRewriter(strip_prefix=self._strip, created=int(time.time()))
        try:
            async for chunk in response.chunks():
                out = rewriter.feed(chunk)
                if out:
                    await responder.body(out)
            tail = rewriter.finish()
        except UpstreamBodyError as exc:
            if rewriter.decided:
                # The images began: the image was made and billed, its answer broke off.
                self._count(call, 1, rewriter.images)
                await hold.settle(hold.amount)
                if responder.started:
                    return "malformed"
                raise UpstreamFailed(
                    "The upstream's answer broke off mid-image.", code="upstream_malformed"
                ) from None
            # A 200 that carries an error object did not produce (or bill) an image.
            await hold.release()
            detail = exc.reason if exc.error is None else str(exc.error.get("message", ""))
            raise UpstreamFailed(
                f"The upstream answered 200 without an image ({detail[:200]})."
            ) from None
        except TransportError:
            # The 200 came, so the image was made and billed; its bytes were lost.
            self._count(call, 1, 0)
            await hold.settle(hold.amount)
            if responder.started:
                return "transport"
            raise UpstreamFailed(
                "The upstream connection was lost while sending the image.",
                code="upstream_connection_lost",
            ) from None
        self._count(call, 1, rewriter.images)
        await hold.settle(hold.amount)
        await responder.finish(tail)
        return "ok"

    def _count(self, call: Call, billed: int, returned: int) -> None:
        ex = call.exchange
        ex.images_billed, ex.images_returned = billed, returned
        ex.cost_micros = billed * call.price
        team = call.hold.team
        self._metrics.images_billed.labels(call.decision.model, team).inc(billed)
        self._metrics.images_returned.labels(call.decision.model, team).inc(returned)

    # fanout --------------------------------------------------------------------------
    async def fanout(self, call: Call, send: Send) -> None:
        """``n`` parallel upstream calls, one response with every image that came back.

        Each call bills one image; the hold covered all ``n``, and the settle keeps only
        what was billed (uncertain where a call was lost after it was sent).
        """
        ex, hold, price, n = call.exchange, call.hold, call.price, call.decision.calls
        started = time.perf_counter()
        results = await asyncio.gather(
            *(self._post(call) for _ in range(n)), return_exceptions=True
        )
        ok: list[UpstreamResponse] = []
        errors: list[ProxyError] = []
        uncertain = 0
        for result in results:
            if isinstance(result, TransportError):
                uncertain += price if result.maybe_billed else 0
                errors.append(
                    UpstreamTimeout("The upstream did not answer in time.")
                    if result.timeout
                    else UpstreamFailed("The upstream could not be reached.")
                )
            elif isinstance(result, BaseException):
                raise result
            elif result.status == 200:
                ok.append(result)
            else:
                raw = await _read_error(result)
                await result.close()
                errors.append(self._error(call, result, raw))
        ex.upstream_status = 200 if ok else errors[0].status
        ex.uncertain_micros = uncertain
        if not ok:
            ex.upstream_seconds = time.perf_counter() - started
            await hold.settle(uncertain, uncertain)
            raise errors[0]
        if len(ok) < n:
            ex.adjusted = "; ".join(x for x in (ex.adjusted, f"images={len(ok)}/{n}") if x)
        responder = Responder(send, self._headers(ex.adjusted), call.capture)
        await responder.body(b'{"created":%d,"data":[' % int(time.time()))
        billed = returned = 0
        try:
            for response in ok:
                billed_one, images = await self._stream_items(response, responder, returned > 0)
                billed += billed_one
                returned += images
        finally:
            ex.upstream_seconds = time.perf_counter() - started
            self._count(call, billed, returned)
            ex.cost_micros = billed * price + uncertain
            await hold.settle(billed * price + uncertain, uncertain)
        await responder.finish(b"]}")

    async def _stream_items(
        self, response: UpstreamResponse, responder: Responder, comma: bool
    ) -> tuple[int, int]:
        """Stream one answer's images into the merged array: (billed, images)."""
        rewriter = ImagesBodyRewriter(strip_prefix=self._strip, created=0, items_only=True)
        try:
            async for chunk in response.chunks():
                out = rewriter.feed(chunk)
                if out and comma:
                    out, comma = b"," + out, False
                await responder.body(out)
            tail = rewriter.finish()
            await responder.body(b"," + tail if tail and comma else tail)
            return 1, rewriter.images
        except UpstreamBodyError:
            return (1 if rewriter.decided else 0), rewriter.images
        except TransportError:
            return 1, rewriter.images
        finally:
            await response.close()


async def _transport_failed(ex: Exchange, hold: Hold, exc: TransportError) -> ProxyError:
    if not exc.maybe_billed:
        await hold.release()
        error = UpstreamFailed("The upstream could not be reached.", code="upstream_unreachable")
        error.should_retry = True
        return error
    ex.uncertain_micros = ex.cost_micros = hold.amount
    await hold.settle(hold.amount, hold.amount)
    if exc.timeout:
        return UpstreamTimeout(
            "The upstream did not answer in time; it may still have billed this call, "
            "so it is not retried."
        )
    return UpstreamFailed(
        "The upstream connection was lost; it may have billed this call.",
        code="upstream_connection_lost",
    )


async def _read_error(response: UpstreamResponse) -> bytes:
    try:
        return await response.read(ERROR_BODY_LIMIT)
    except TransportError:
        return b""
