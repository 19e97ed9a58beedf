"""The upstream call and its answer: one call, or ``n`` in parallel (fanout).

The forwarding code only reports what happened to each upstream call (an
``Outcome``); ``money.charge`` decides what that costs, and the hold is settled
with it exactly once. The last response byte is sent only after the ledger has the
outcome, so a client's next call never races it.

A call has one deadline (``upstream.total_timeout_seconds``) over the upstream call
and the streaming of its answer to the client, so neither a trickling upstream nor a
client that reads slowly keeps it alive past the time its hold is renewed for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.types import Send

from .auth import Caller
from .config import Settings
from .errors import ProxyError, UpstreamFailed, UpstreamTimeout
from .exchange import Exchange
from .ledger import Hold
from .metrics import Metrics, UpstreamOutcome
from .money import Outcome, charge
from .policy import Decision
from .results import Capture
from .rewrite import ImagesBodyRewriter, UpstreamBodyError
from .upstream import TransportError, UpstreamClient, UpstreamResponse
from .upstream_errors import Answered, Scrubber, scrubber, upstream_error

ERROR_BODY_LIMIT = 64 * 1024
HOLD_BYTES = 64 * 1024
log = logging.getLogger("apiyi_proxy.upstream")
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
        self._total = settings.upstream.total_timeout_seconds
        self._scrub = scrubber(settings)

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

    def _error(self, call: Call, response: UpstreamResponse, raw: bytes) -> Answered:
        answered = upstream_error(
            response.status,
            raw,
            dict(response.headers),
            scrub=self._scrub,
            caller_key=call.caller.upstream_key,
        )
        if answered.outcome is UpstreamOutcome.QUOTA:
            log.warning(
                "the upstream refused a %s call: the proxy's upstream account is out of "
                "quota; every call fails until it is topped up",
                call.decision.model,
            )
        elif answered.outcome is UpstreamOutcome.AUTH:
            log.warning(
                "the upstream refused the proxy's upstream key (status %d); every call "
                "fails until APIYI_API_KEY is fixed",
                response.status,
            )
        return answered

    def _count(self, call: Call, outcomes: list[UpstreamOutcome]) -> None:
        calls = self._metrics.upstream_calls
        for outcome in outcomes:
            calls.labels(call.decision.model, outcome.value).inc()

    def _headers(self, adjusted: str | None) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if adjusted:
            headers.append((b"x-proxy-adjusted", adjusted.encode()))
        return headers

    async def _settle(self, call: Call, outcomes: list[Outcome], returned: int) -> None:
        """Settle the hold with what the calls' outcomes cost, and count the images."""
        ex = call.exchange
        cost = charge(outcomes, call.price)
        ex.cost_micros, ex.uncertain_micros = cost.spent, cost.uncertain
        # A 200 means the upstream made (and billed) an image, whatever became of it.
        billed = sum(o in _ANSWERED_200 for o in outcomes)
        ex.images_billed, ex.images_returned = billed, returned
        model, team = call.decision.model, call.hold.team
        self._metrics.images_billed.labels(model, team).inc(billed)
        self._metrics.images_returned.labels(model, team).inc(returned)
        await call.hold.settle(cost)

    # one call ------------------------------------------------------------------------
    async def single(self, call: Call, send: Send) -> None:
        ex = call.exchange
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self._total
        outcome = Outcome.CRASH
        answered: UpstreamOutcome | None = None  # a non-200 answer's outcome
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    response = await self._post(call)
            except (TransportError, TimeoutError) as exc:
                outcome = _sent_outcome(exc)
                await self._settle(call, [outcome], 0)
                raise _transport_error(outcome) from None
            ex.upstream_status = response.status
            try:
                if response.status != 200:
                    # refused: the upstream said no to this request (moderation, quota,
                    # a bad key); failed: it could not serve it.
                    outcome = Outcome.REFUSED if response.status < 500 else Outcome.FAILED
                    raw = await _read_error(response)
                    error, answered = self._error(call, response, raw)
                    await self._settle(call, [outcome], 0)
                    raise error
                outcome = await self._stream_one(call, response, send, deadline)
            finally:
                await response.close()
        finally:
            ex.upstream_seconds = time.perf_counter() - started
            model = call.decision.model
            self._metrics.upstream_seconds.labels(model, outcome.value).observe(ex.upstream_seconds)
            self._count(call, [answered or UpstreamOutcome.of(outcome)])

    async def _stream_one(
        self, call: Call, response: UpstreamResponse, send: Send, deadline: float
    ) -> Outcome:
        """Stream a 200 to the client; returns its outcome, or raises the error to send
        (the hold settled either way)."""
        responder = Responder(send, self._headers(call.exchange.adjusted), call.capture)
        rewriter = ImagesBodyRewriter(strip_prefix=self._strip, created=int(time.time()))
        try:
            async with asyncio.timeout_at(deadline):
                async for chunk in response.chunks():
                    out = rewriter.feed(chunk)
                    if out:
                        await responder.body(out)
                tail = rewriter.finish()
        except (UpstreamBodyError, TransportError, TimeoutError) as exc:
            outcome = _broken_200(exc, rewriter.decided)
            await self._settle(call, [outcome], rewriter.images)
            if responder.started:
                return outcome  # the client's stream just ends, cut short
            raise _broken_200_error(exc, outcome, self._scrub, call.caller.upstream_key) from None
        await self._settle(call, [Outcome.IMAGE], rewriter.images)
        await responder.finish(tail)
        return Outcome.IMAGE

    # fanout --------------------------------------------------------------------------
    async def fanout(self, call: Call, send: Send) -> None:
        """``n`` parallel upstream calls, one response with every image that came back.

        The hold covered all ``n``; the settle keeps what their outcomes cost.
        """
        ex, n = call.exchange, call.decision.calls
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self._total
        try:
            async with asyncio.timeout_at(deadline):
                results = await asyncio.gather(
                    *(self._post(call) for _ in range(n)), return_exceptions=True
                )
        except TimeoutError:
            ex.upstream_seconds = time.perf_counter() - started
            self._count(call, [UpstreamOutcome.TIMEOUT] * n)
            await self._settle(call, [Outcome.TIMEOUT] * n, 0)
            raise _transport_error(Outcome.TIMEOUT) from None
        ok: list[UpstreamResponse] = []
        errors: list[ProxyError] = []
        outcomes: list[Outcome] = []
        counted: list[UpstreamOutcome] = []  # of the calls that brought no 200
        for result in results:
            if isinstance(result, TransportError):
                outcome = _sent_outcome(result)
                outcomes.append(outcome)
                counted.append(UpstreamOutcome.of(outcome))
                errors.append(_transport_error(outcome))
            elif isinstance(result, BaseException):
                raise result
            elif result.status == 200:
                ok.append(result)
            else:
                outcomes.append(Outcome.REFUSED if result.status < 500 else Outcome.FAILED)
                raw = await _read_error(result)
                await result.close()
                error, answered = self._error(call, result, raw)
                counted.append(answered)
                errors.append(error)
        ex.upstream_status = 200 if ok else errors[0].status
        if not ok:
            ex.upstream_seconds = time.perf_counter() - started
            self._count(call, counted)
            await self._settle(call, outcomes, 0)
            raise errors[0]
        if len(ok) < n:
            ex.adjusted = "; ".join(x for x in (ex.adjusted, f"images={len(ok)}/{n}") if x)
        responder = Responder(send, self._headers(ex.adjusted), call.capture)
        returned = 0
        timed_out = False
        try:
            async with asyncio.timeout_at(deadline):
                await responder.body(b'{"created":%d,"data":[' % int(time.time()))
                for response in ok:
                    outcome, images = await self._stream_items(response, responder, returned > 0)
                    outcomes.append(outcome)
                    returned += images
        except TimeoutError:
            timed_out = True
        finally:
            ex.upstream_seconds = time.perf_counter() - started
            for response in ok:
                await response.close()
            # Answers not read to the end came as 200s: their images were made.
            outcomes += [Outcome.CUT_BEFORE_IMAGE] * (n - len(outcomes))
            self._count(call, counted + [UpstreamOutcome.of(o) for o in outcomes[len(counted) :]])
            await self._settle(call, outcomes, returned)
        if timed_out:
            if responder.started:
                return  # the client's stream just ends, cut short
            raise _transport_error(Outcome.TIMEOUT)
        await responder.finish(b"]}")

    async def _stream_items(
        self, response: UpstreamResponse, responder: Responder, comma: bool
    ) -> tuple[Outcome, int]:
        """Stream one answer's images into the merged array: (outcome, images)."""
        rewriter = ImagesBodyRewriter(strip_prefix=self._strip, created=0, items_only=True)
        try:
            async for chunk in response.chunks():
                out = rewriter.feed(chunk)
                if out and comma:
                    out, comma = b"," + out, False
                await responder.body(out)
            tail = rewriter.finish()
            await responder.body(b"," + tail if tail and comma else tail)
            return Outcome.IMAGE, rewriter.images
        except (UpstreamBodyError, TransportError) as exc:
            return _broken_200(exc, rewriter.decided), rewriter.images
        finally:
            await response.close()


# A 200 came back for these: the upstream made an image, whatever became of its bytes.
_ANSWERED_200 = frozenset({Outcome.IMAGE, Outcome.CUT_AFTER_IMAGE, Outcome.CUT_BEFORE_IMAGE})


def _sent_outcome(exc: TransportError | TimeoutError) -> Outcome:
    """What a transport failure (or the call's deadline) before any answer means."""
    if isinstance(exc, TimeoutError):
        return Outcome.TIMEOUT
    if not exc.maybe_billed:
        return Outcome.NOT_SENT
    return Outcome.TIMEOUT if exc.timeout else Outcome.LOST


def _transport_error(outcome: Outcome) -> ProxyError:
    if outcome is Outcome.NOT_SENT:
        error = UpstreamFailed("The upstream could not be reached.", code="upstream_unreachable")
        error.should_retry = True  # nothing was sent, so nothing was billed
        return error
    if outcome is Outcome.TIMEOUT:
        return UpstreamTimeout(
            "The upstream did not answer in time; it may still have billed this call, "
            "so it is not retried."
        )
    return UpstreamFailed(
        "The upstream connection was lost; it may have billed this call.",
        code="upstream_connection_lost",
    )


def _broken_200(
    exc: UpstreamBodyError | TransportError | TimeoutError, images_began: bool
) -> Outcome:
    """What a 200 whose body did not arrive whole means for the call."""
    if isinstance(exc, UpstreamBodyError) and not images_began and exc.error is not None:
        return Outcome.ERROR_IN_200  # an error object: no image was made
    return Outcome.CUT_AFTER_IMAGE if images_began else Outcome.CUT_BEFORE_IMAGE


def _broken_200_error(
    exc: UpstreamBodyError | TransportError | TimeoutError,
    outcome: Outcome,
    scrub: Scrubber,
    caller_key: str | None,
) -> ProxyError:
    if outcome is Outcome.ERROR_IN_200:
        assert isinstance(exc, UpstreamBodyError) and exc.error is not None
        detail = scrub.text(exc.error.get("message"), (caller_key,))
        return UpstreamFailed(f"The upstream answered 200 without an image ({detail[:200]}).")
    if isinstance(exc, TimeoutError) or (isinstance(exc, TransportError) and exc.timeout):
        return UpstreamTimeout(
            "The upstream's answer did not finish in time; it may have billed this call, "
            "so it is not retried."
        )
    if isinstance(exc, TransportError):
        return UpstreamFailed(
            "The upstream connection was lost while sending the image.",
            code="upstream_connection_lost",
        )
    if outcome is Outcome.CUT_AFTER_IMAGE:
        return UpstreamFailed(
            "The upstream's answer broke off mid-image.", code="upstream_malformed"
        )
    return UpstreamFailed(
        f"The upstream answered 200 without an image ({exc.reason}); it may have billed this call.",
        code="upstream_malformed",
    )


async def _read_error(response: UpstreamResponse) -> bytes:
    try:
        return await response.read(ERROR_BODY_LIMIT)
    except TransportError:
        return b""
