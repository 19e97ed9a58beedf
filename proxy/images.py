"""``POST /v1/images/generations`` and ``/v1/images/edits``: the proxied calls.

Order (SPEC section 5): size limit → parse → auth → policy → idempotency → hold →
upstream. Nothing that fails before the hold reaches the upstream or reserves money;
after it, ``forward`` resolves the hold exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import orjson
from starlette.types import Message, Receive, Scope, Send

from . import edits
from .auth import Authenticator, Caller
from .config import Settings
from .errors import ProxyError
from .exchange import Exchange, exchange_of
from .forward import Body, Call, Forwarder
from .http import ClientGone, header_map, parse_json_object, read_body, send_error
from .idempotency import (
    Claim,
    Idempotency,
    Replay,
    fingerprint,
    joins_until_delivered,
    result_unavailable,
)
from .keys import KeyHasher
from .ledger import Ledger
from .metrics import Metrics, rejection
from .money import Outcome, Resolution, charge
from .policy import Decision, RequestPolicy
from .upstream import UpstreamClient
from .upstream_errors import key_refused


@dataclass(frozen=True)
class Services:
    """What the image routes share, built once per app."""

    settings: Settings
    policy: RequestPolicy
    auth: Authenticator
    ledger: Ledger
    upstream: UpstreamClient
    metrics: Metrics
    hasher: KeyHasher
    idempotency: Idempotency


@dataclass(slots=True)
class Admitted:
    """A request that passed parsing, auth and policy."""

    headers: Mapping[str, str]
    caller: Caller
    decision: Decision
    upstream_body: bytes | edits.EditForm

    def body(self) -> Body:
        if isinstance(self.upstream_body, bytes):
            return self.upstream_body, {"content-type": "application/json"}
        return self.upstream_body.upstream_body(self.decision.body)

    def fingerprint(self) -> str:
        if isinstance(self.upstream_body, bytes):
            return fingerprint(self.upstream_body)
        encoded = orjson.dumps(self.decision.body, option=orjson.OPT_SORT_KEYS)
        return fingerprint(
            encoded, *(_digest(u.file.fileno()) for _, u in self.upstream_body.images)
        )


class Presence:
    """Whether the answer reached a connected client.

    Once the request body is read, a task waits for the client's disconnect; the
    wrapped ``send`` notes, as the last byte of the answer leaves, whether the client
    was still there. (The server takes sends to a gone client without a word.)
    """

    __slots__ = ("_watch", "delivered")

    def __init__(self, receive: Receive) -> None:
        self._watch = asyncio.ensure_future(_disconnected(receive))
        self.delivered = False

    def wrap(self, send: Send) -> Send:
        async def tracked(message: Message) -> None:
            if message["type"] != "http.response.body" or message.get("more_body"):
                await send(message)
                return
            # Asked before the last send: once the answer is complete, the server
            # tells every receive() the client is gone.
            await asyncio.sleep(0)  # let a disconnect already seen reach the watch
            gone = self._watch.done()
            await send(message)
            self.delivered = not gone

        return tracked

    def close(self) -> None:
        self._watch.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass(slots=True)
class Dedupe:
    """A request's part in an idempotency scope: the claim it owns, and whether its
    client got the answer."""

    claim: Claim | None = None
    presence: Presence | None = None


class ImagesEndpoint:
    def __init__(self, services: Services, kind: Literal["generations", "edits"]) -> None:
        self.s = services
        self.kind = kind
        self.route = f"/v1/images/{kind}"
        self._prices = {m.name: m.price_micros for m in services.settings.policy.models}
        self._forwarder = Forwarder(
            services.settings, services.upstream, services.metrics, f"/images/{kind}"
        )
        self._in_flight = services.metrics.in_flight.labels(self.route)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex = exchange_of(scope)
        ex.route = self.route
        form: edits.EditForm | None = None
        dedupe = Dedupe()
        admitted: Admitted | None = None
        self._in_flight.inc()
        try:
            admitted = await self._admit(scope, receive, ex)
            if isinstance(admitted.upstream_body, edits.EditForm):
                form = admitted.upstream_body
            await self._run(ex, admitted, receive, send, dedupe)
        except ProxyError as error:
            ex.error_code = error.code
            if admitted is not None and key_refused(error):
                await self.s.auth.forget_refused(admitted.caller, ex.hold)
                ex.key_forgotten = admitted.caller.upstream_key is not None
            reason = rejection(error)  # None for the upstream's answers, counted as calls
            if reason is not None:
                self.s.metrics.rejections.labels(reason.value).inc()
            presence = dedupe.presence
            await send_error(presence.wrap(send) if presence else send, error)
        except ClientGone:
            ex.error_code = "client_gone"
        finally:
            self._in_flight.dec()
            if dedupe.claim is not None:
                await self._close_claim(dedupe, ex)
            if dedupe.presence is not None:
                dedupe.presence.close()
            form = form or scope["state"].pop("edit_form", None)
            if form is not None:
                await form.close()

    async def _admit(self, scope: Scope, receive: Receive, ex: Exchange) -> Admitted:
        headers = header_map(scope)
        policy = self.s.settings.policy
        upstream_body: bytes | edits.EditForm
        if self.kind == "generations":
            payload = parse_json_object(await read_body(scope, receive, self.s.policy.body_limit))
            caller = await self.s.auth.authenticate(headers)
            decision = self.s.policy.generation(payload)
            # A copy: orjson's own result keeps a 4 KiB buffer, held for the whole call.
            upstream_body = bytes(memoryview(orjson.dumps(decision.body)))
        else:
            form = await edits.read_form(scope, receive, headers, policy)
            caller = await self.s.auth.authenticate(headers)
            decision = self.s.policy.edit(form.fields)
            form.check_images(policy.max_edit_images)
            upstream_body = form
        ex.key_id, ex.key_name, ex.team = caller.key.id, caller.key.name, caller.key.team
        ex.model, ex.size = decision.model, decision.body.get("size")
        ex.adjusted = decision.adjusted_header
        caller.check_model(decision.model)
        return Admitted(headers, caller, decision, upstream_body)

    async def _run(
        self, ex: Exchange, admitted: Admitted, receive: Receive, send: Send, dedupe: Dedupe
    ) -> None:
        idempotency = self.s.idempotency
        headers = admitted.headers
        if joins_until_delivered(headers):
            dedupe.presence = Presence(receive)
            send = dedupe.presence.wrap(send)
        found = await idempotency.begin(headers, admitted.caller.key, admitted.fingerprint)
        if found is None:
            await self._charge_and_forward(ex, admitted, send, None)
            return
        if isinstance(found, Replay):
            if not await idempotency.replay(found, send):
                raise result_unavailable()  # never a second paid call
            ex.replay = found.kind
            if dedupe.presence is not None and dedupe.presence.delivered:
                with contextlib.suppress(ProxyError):
                    await idempotency.consume(found)
            return
        dedupe.claim = found
        await self._charge_and_forward(ex, admitted, send, found)

    async def _charge_and_forward(
        self, ex: Exchange, admitted: Admitted, send: Send, claim: Claim | None
    ) -> None:
        decision = admitted.decision
        price = self._prices[decision.model]
        await self.s.auth.record(admitted.caller)  # a passthrough key is metered from here
        hold = await self.s.ledger.hold(
            admitted.caller.key,
            decision.model,
            price * decision.images,
            claim=claim.request() if claim else None,
        )
        ex.hold, ex.held_micros = hold.id, hold.amount
        if claim is not None and not claim.stored:
            if hold.claimed:
                claim.stored = True
            else:  # an identical first attempt has the scope: this is a call of its own
                claim.capture.discard()
                claim = None
        call = Call(
            ex,
            admitted.caller,
            decision,
            admitted.body,
            hold,
            price,
            claim.capture if claim else None,
        )
        try:
            if decision.calls > 1:
                await self._forwarder.fanout(call, send)
            else:
                await self._forwarder.single(call, send)
        finally:
            if hold.outcome is None:
                # Cancelled or failed in a way not foreseen: the upstream may have
                # billed, so keep the money and say we do not know.
                cost = charge([Outcome.CRASH] * decision.calls, price)
                ex.uncertain_micros = ex.cost_micros = cost.uncertain
                await hold.settle(cost)
            ex.hold_outcome = hold.outcome

    async def _close_claim(self, dedupe: Dedupe, ex: Exchange) -> None:
        """Record how the claimed call ended, for its duplicates."""
        claim = dedupe.claim
        assert claim is not None
        idempotency = self.s.idempotency
        delivered = dedupe.presence is not None and dedupe.presence.delivered
        try:
            if not claim.stored:
                claim.capture.discard()  # never taken: the scope was someone else's
            elif ex.hold_outcome is None or ex.hold_outcome == Resolution.RELEASED.value:
                await idempotency.abandon(claim)  # nothing was billed
            elif delivered:
                await idempotency.abandon(claim)  # an answer that arrived is never joined
            elif ex.status == 200 and ex.images_returned:
                headers = [(b"content-type", b"application/json")]
                if ex.adjusted:
                    headers.append((b"x-proxy-adjusted", ex.adjusted.encode()))
                await idempotency.succeeded(claim, headers)
            else:
                await idempotency.uncertain(claim)
        except ProxyError:
            # The claim ends with its hold's lease; nothing is lost but a replay.
            claim.capture.discard()


def _digest(fd: int) -> bytes:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        offset += len(chunk)
        h.update(chunk)
    return h.digest()
