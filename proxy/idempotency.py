"""Never pay twice for one picture: ``Idempotency-Key`` and OpenAI SDK retries.

Two kinds of scope, both per client key and across replicas (records in the store,
replay bodies in the results store):

- ``Idempotency-Key: K`` (24 h): a finished duplicate replays the stored answer
  without charge, an in-flight duplicate waits for it (409 if it outlasts the wait),
  the same K with a different body is a 422.
- An SDK retry (``x-stainless-retry-count >= 1``) of the same key and body joins a
  first attempt only while that attempt's answer has not reached its client: still
  in flight, or finished after its client went away. An answer delivered in full is
  never joined (the retry is a new call), and a replay delivered in full is not
  joined again. First attempts (``x-stainless-retry-count: 0``) claim their
  fingerprint so a retry can find them, in the same store step as their hold (no
  extra round trip); two identical first attempts are two calls and do not join.

A claim is linked to its call's hold: it lives as long as the hold is renewed, and
if the hold expires (its replica died) the claim ends as an uncertain outcome. Only
a certain outcome is recorded: a success (replayable), or an uncertain one (a
duplicate gets 409 rather than paying again). A call that surely was not billed
forgets its claim, so the duplicate simply runs; so does a duplicate whose stored
answer is gone: it gets 409, never a second paid call.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from starlette.types import Send

from .config import Settings
from .errors import Conflict, IdempotencyMismatch, InvalidRequest, StoreUnavailable
from .ledger import Ledger
from .metrics import Metrics
from .results import Capture, ResultStore
from .store import ClaimRequest, IdemRecord, IdemState, KeyRecord, group_of
from .store.base import CLAIM_LEASES, UNCERTAIN_STATUS

POLL_SECONDS = (0.05, 0.1, 0.2, 0.25, 0.5)
# A waiter whose first attempt finished unjoinable tries to take the scope again.
MAX_ROUNDS = 3


@dataclass(slots=True)
class Claim:
    """This request owns an idempotency scope until it finishes.

    An SDK first attempt's claim is not stored by ``begin``: it rides on the hold's
    reserve step (``request()``), which takes it only if the scope is free. Either way
    the reserve links the claim to the hold, so it lives (and dies) with it.
    """

    scope: str
    owner: str
    explicit: bool
    ttl_seconds: float  # how long the finished record is kept
    capture: Capture
    fingerprint: str = ""
    lease_seconds: float = 0.0
    stored: bool = True

    def request(self) -> ClaimRequest:
        return ClaimRequest(
            self.scope,
            self.fingerprint,
            self.lease_seconds,
            self.owner,
            owned=self.stored,
            keep_seconds=self.ttl_seconds,
        )


@dataclass(frozen=True)
class Replay:
    record: IdemRecord
    kind: str  # idempotency_key or sdk_retry
    scope: str


class Idempotency:
    def __init__(
        self, settings: Settings, ledger: Ledger, results: ResultStore, metrics: Metrics
    ) -> None:
        self._ledger = ledger
        self._store = ledger.store
        self._results = results
        self._metrics = metrics
        self._explicit_ttl = float(settings.ledger.idempotency_ttl_seconds)
        self._join_ttl = float(settings.ledger.retry_join_seconds)
        self._result_limit = settings.store.results_max_bytes
        # A claim is leased, and renewed with the hold the reserve links it to.
        self._lease = ledger.lease * CLAIM_LEASES
        self._max_wait = ledger.max_call_seconds

    async def begin(
        self, headers: Mapping[str, str], key: KeyRecord, body_fingerprint: Callable[[], str]
    ) -> Claim | Replay | None:
        """Claim the request's scope, or find the earlier call to replay; None: neither."""
        idem_key = headers.get("idempotency-key")
        if idem_key:
            if len(idem_key) > 255:
                raise InvalidRequest(
                    "Idempotency-Key is longer than 255 characters.",
                    code="invalid_idempotency_key",
                    param="Idempotency-Key",
                )
            scope = _scope("ik", key.id, idem_key, group_of(key.id, key.team))
            return await self._claim_or_join(scope, body_fingerprint(), True, self._explicit_ttl)
        retry = headers.get("x-stainless-retry-count")
        if retry is None:  # no SDK call either (see ``joins_until_delivered``)
            return None
        fingerprint = body_fingerprint()
        scope = _scope("rj", key.id, fingerprint, group_of(key.id, key.team))
        if retry.strip() in ("", "0"):
            # A first attempt: claimed with its hold, so that a retry can join it.
            capture = Capture(self._result_limit)
            owner = secrets.token_hex(8)
            return Claim(
                scope, owner, False, self._join_ttl, capture, fingerprint, self._lease, False
            )
        return await self._claim_or_join(scope, fingerprint, False, self._join_ttl)

    async def _claim_or_join(
        self, scope: str, fingerprint: str, explicit: bool, keep: float
    ) -> Claim | Replay:
        """Take the scope if it is free, wait while another call holds it, or replay
        what that call left."""
        kind = "idempotency_key" if explicit else "sdk_retry"
        for _ in range(MAX_ROUNDS):
            owner = secrets.token_hex(8)
            record = await self._begin(scope, fingerprint, owner)
            if record.state is IdemState.MISMATCH:
                raise IdempotencyMismatch(
                    "This Idempotency-Key was used with a different request body."
                )
            if record.state is IdemState.NEW:
                capture = Capture(self._result_limit)
                return Claim(scope, owner, explicit, keep, capture, fingerprint, self._lease)
            if record.state is IdemState.IN_FLIGHT:
                record = await self._wait(scope, fingerprint)
            if record.state is IdemState.DONE:
                return self._replay_or_conflict(record, kind, scope)
            # The other call finished and let go of the scope: try to take it.
        raise Conflict("An identical request is in progress; try again later.")

    async def _begin(self, scope: str, fingerprint: str, owner: str) -> IdemRecord:
        claim = functools.partial(
            self._store.idem_begin, scope, fingerprint, self._lease, owner=owner
        )
        try:
            return await self._ledger.call("idempotency", claim)
        except StoreUnavailable as error:
            # The claim may still land after we stopped waiting: abandon it once the
            # store answers, or a retry of this very call would wait on a ghost.
            if error.maybe_applied:
                step = self._abandon_step(scope, owner)
                self._ledger.write_later(f"idem:{scope}:{owner}", "idempotency", step)
            raise

    def _abandon_step(self, scope: str, owner: str) -> Callable[[], Awaitable[None]]:
        return functools.partial(self._store.idem_abandon, scope, owner, self._max_wait)

    async def _wait(self, scope: str, fingerprint: str) -> IdemRecord:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait
        attempt = 0
        while loop.time() < deadline:
            await asyncio.sleep(POLL_SECONDS[min(attempt, len(POLL_SECONDS) - 1)])
            attempt += 1
            record = await self._ledger.call(
                "idempotency",
                lambda: self._store.idem_begin(scope, fingerprint, 0, join_only=True),
            )
            if record.state is not IdemState.IN_FLIGHT:
                return record
        raise Conflict("An identical request is still in progress; try again later.")

    def _replay_or_conflict(self, record: IdemRecord, kind: str, scope: str) -> Replay:
        if record.status == UNCERTAIN_STATUS:
            raise Conflict(
                "An identical earlier request ended without a certain result (it may have "
                "been billed); it is not run again.",
                code="idempotent_outcome_uncertain",
            )
        if not record.result_id:
            raise result_unavailable()
        return Replay(record, kind, scope)

    async def replay(self, replay: Replay, send: Send) -> bool:
        """Send the stored answer; False if its body is gone (nothing was sent)."""
        assert replay.record.result_id is not None
        body = await self._results.get(replay.record.result_id)
        if body is None:
            return False
        headers = [(k.encode(), v.encode()) for k, v in replay.record.headers]
        headers.append((b"x-proxy-replay", replay.kind.encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async for chunk in body:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self._metrics.idempotent_replays.labels(replay.kind).inc()
        return True

    async def consume(self, replay: Replay) -> None:
        """A replay reached its client: the answer is never joined again."""
        assert replay.record.result_id is not None
        scope, result_id = replay.scope, replay.record.result_id
        await self._ledger.call("idempotency", lambda: self._store.idem_consume(scope, result_id))

    async def succeeded(self, claim: Claim, headers: list[tuple[bytes, bytes]]) -> None:
        result_id = secrets.token_hex(16)
        stored = await self._results.put(result_id, claim.capture, claim.ttl_seconds)
        claim.capture.discard()
        record = IdemRecord(
            IdemState.DONE,
            200,
            result_id if stored else None,
            tuple((k.decode(), v.decode()) for k, v in headers),
        )
        await self._finish(claim, record)

    async def uncertain(self, claim: Claim) -> None:
        claim.capture.discard()
        await self._finish(claim, IdemRecord(IdemState.DONE, UNCERTAIN_STATUS))

    async def _finish(self, claim: Claim, record: IdemRecord) -> None:
        await self._ledger.call(
            "idempotency", lambda: self._store.idem_finish(claim.scope, record, claim.ttl_seconds)
        )

    async def abandon(self, claim: Claim) -> None:
        claim.capture.discard()
        await self._ledger.call("idempotency", self._abandon_step(claim.scope, claim.owner))


def joins_until_delivered(headers: Mapping[str, str]) -> bool:
    """An SDK call without an Idempotency-Key: ``begin`` gives it a scope that its
    retries join only while its answer has not reached its client."""
    return not headers.get("idempotency-key") and "x-stainless-retry-count" in headers


def result_unavailable() -> Conflict:
    """An identical call was answered and billed, but its answer cannot be replayed."""
    return Conflict(
        "An identical earlier request was answered, but its stored answer is not "
        "available; it is not run again.",
        code="idempotent_result_unavailable",
    )


def _scope(kind: str, key_id: str, value: str, group: str) -> str:
    digest = hashlib.sha256(f"{kind}\0{key_id}\0{value}".encode()).hexdigest()[:40]
    return f"{kind}{digest}@{group}"


def fingerprint(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()
