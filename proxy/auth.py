"""Who is calling: a proxy-issued key (``keys`` mode) or an upstream key (``passthrough``).

Key records are cached for ``auth.key_cache_seconds`` so that the request path needs no
store round trip beyond the hold and its settle. A record that changes anywhere is
dropped within a second: the store announces every change and the cache is told
(``store.invalidation``); while those announcements may be missed, a record is kept a
second at most. The hold step itself re-reads the key atomically, so money never
depends on the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import Settings
from .errors import Forbidden, ProxyError, StoreUnavailable, Unauthorized
from .keys import KeyHasher
from .ledger import Ledger
from .store import KeyRecord

if TYPE_CHECKING:
    from .store.invalidation import Invalidations

CACHE_ENTRIES = 10_000
# What an upstream key of this provider family looks like. In passthrough mode anything
# else is refused before it costs an upstream call or a ledger record.
UPSTREAM_KEY_SHAPE = re.compile(r"sk-[A-Za-z0-9]{32,64}")


@dataclass(frozen=True, slots=True)
class Caller:
    key: KeyRecord
    # The key sent upstream: the client's own in passthrough mode, else the proxy's.
    upstream_key: str | None

    def check_model(self, model: str) -> None:
        if self.key.models and model not in self.key.models:
            raise Forbidden(
                f"This key may not use the model {model!r}.",
                code="model_not_allowed",
                param="model",
            )


def bearer_token(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def bears(headers: Mapping[str, str], token: str) -> bool:
    """Whether the request carries ``token`` as its bearer token (compared in constant
    time): the admin token for /admin, the metrics token for /metrics."""
    return same_secret(bearer_token(headers) or "", token)


def same_secret(given: str, secret: str) -> bool:
    """``given`` is ``secret``, compared in constant time."""
    return hmac.compare_digest(given.encode(), secret.encode())


class Authenticator:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        hasher: KeyHasher,
        invalidations: Invalidations | None = None,
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._hasher = hasher
        self._ttl = settings.auth.key_cache_seconds
        self._default_limits = settings.ledger.default_limits()
        # Key hash -> (when the read of the record began, the record).
        self._cache: OrderedDict[str, tuple[float, KeyRecord]] = OrderedDict()
        self._fetches: dict[str, asyncio.Task[KeyRecord | None]] = {}
        # Without a subscription, only this process writes the store and tells the cache.
        self._trusted = invalidations.trusted if invalidations else lambda read_at, now: True
        self._forgotten = 0  # counts forgets: a read begun before one is not kept
        self._fail_open = settings.store.on_error == "open"

    async def authenticate(self, headers: Mapping[str, str]) -> Caller:
        """The caller, or 401. An unseen passthrough key gets the record it would have,
        unsaved: only ``record`` saves it, once a paid call is about to be made."""
        token = bearer_token(headers)
        if token is None:
            raise Unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        if self._settings.auth.mode == "passthrough":
            if not UPSTREAM_KEY_SHAPE.fullmatch(token):
                raise Unauthorized(
                    "Incorrect API key provided: an upstream key is 'sk-' and 32 to 64 "
                    "letters or digits."
                )
            key_hash = self._hasher.hash(token)
            metered = await self._passthrough_record(key_hash, token)
            return Caller(metered, upstream_key=token)
        key_hash = self._hasher.hash(token)
        record = await self._lookup(key_hash)
        if record is None or record.revoked or not hmac.compare_digest(record.key_hash, key_hash):
            raise Unauthorized("Incorrect API key provided.")
        return Caller(record, upstream_key=None)

    async def _lookup(self, key_hash: str) -> KeyRecord | None:
        cached = self._cached(key_hash, time.monotonic())
        if cached is not None:
            return cached
        # One store read per key however many requests arrive for it at once (a burst
        # on a cold cache would otherwise queue for the store and time out), in a task
        # of its own so that one caller going away does not fail the others.
        fetch = self._fetches.get(key_hash)
        if fetch is None:
            fetch = asyncio.create_task(self._fetch(key_hash))
            self._fetches[key_hash] = fetch
            fetch.add_done_callback(functools.partial(self._fetched, key_hash))
        return await asyncio.shield(fetch)

    def _cached(self, key_hash: str, now: float) -> KeyRecord | None:
        entry = self._cache.get(key_hash)
        if entry is None:
            return None
        read_at, record = entry
        if now - read_at >= self._ttl or not self._trusted(read_at, now):
            return None
        return record

    async def _fetch(self, key_hash: str) -> KeyRecord | None:
        forgotten, began = self._forgotten, time.monotonic()
        try:
            record = await self._ledger.call(
                "key", lambda: self._ledger.store.key_by_hash(key_hash)
            )
        except StoreUnavailable:
            # store.on_error open: a dead store lets calls through, on the record last
            # read (within the cache's lifetime) even though no change can be heard.
            stale = self._cache.get(key_hash)
            if self._fail_open and stale is not None and began - stale[0] < self._ttl:
                return stale[1]
            raise
        if record is not None and forgotten == self._forgotten:
            self._remember(key_hash, record, began)
        return record

    def _fetched(self, key_hash: str, fetch: asyncio.Task[KeyRecord | None]) -> None:
        if self._fetches.get(key_hash) is fetch:
            del self._fetches[key_hash]
        if not fetch.cancelled():
            fetch.exception()  # retrieved here too, in case every caller went away

    def _remember(self, key_hash: str, record: KeyRecord, read_at: float) -> None:
        self._cache[key_hash] = (read_at, record)
        self._cache.move_to_end(key_hash)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)

    def forget(self, key_hash: str) -> None:
        """Drop a record that changed, and any read of it begun before."""
        self._cache.pop(key_hash, None)
        self._fetches.pop(key_hash, None)
        self._forgotten += 1

    def clear(self) -> None:
        """Drop every record (changes may have been missed)."""
        self._cache.clear()
        self._fetches.clear()
        self._forgotten += 1

    async def record(self, caller: Caller) -> None:
        """Save a passthrough key's ledger record once its request passed every check
        and is about to hold money: a refused request leaves no state behind."""
        if caller.upstream_key is None:
            return
        key = caller.key
        cached = self._cache.get(key.key_hash)
        if cached is not None and cached[1].id == key.id:
            return  # saved already (or read from the store)
        await self._ledger.call("key", lambda: self._ledger.store.add_key(key))
        self._remember(key.key_hash, key, time.monotonic())

    async def forget_refused(self, caller: Caller, hold_id: str | None) -> None:
        """Drop the ledger record of a passthrough key the upstream refused, so that
        made-up keys leave nothing behind; ``hold_id`` is the refused call's hold.

        The store keeps a record with money held or spent on it. One older than the
        current budget periods is kept too: its spend there is not looked at.
        """
        record = caller.key
        if caller.upstream_key is None:
            return
        self.forget(record.key_hash)
        periods = self._ledger.periods()
        if self._ledger.periods(record.created) != periods:
            return
        holds = (hold_id,) if hold_id else ()
        store = self._ledger.store
        with contextlib.suppress(ProxyError):  # best effort: the answer is decided
            await self._ledger.call("key", lambda: store.forget_key(record.id, periods, holds))

    async def _passthrough_record(self, key_hash: str, token: str) -> KeyRecord:
        """The ledger record metering an upstream key: the stored one, or a new one
        (saved by ``record``)."""
        record = await self._lookup(key_hash)
        if record is not None:
            return record
        return KeyRecord(
            id="pt_" + key_hash[:16],
            name=f"passthrough …{token[-4:]}",
            key_hash=key_hash,
            last4=token[-4:],
            created=int(time.time()),
            limits=self._default_limits,
        )
