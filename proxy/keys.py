"""Client keys: generation, peppered HMAC hashing and display.

A key is ``sk-`` and 43 URL-safe base64 characters (256 bits). Only its
HMAC-SHA-256 under the server pepper is stored; lookups hash the presented key and
find the record by that hash, and the final comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from .store import KeyRecord, Limits

KEY_PREFIX = "sk-"


class KeyHasher:
    """HMAC-SHA-256 of client keys under the server pepper."""

    def __init__(self, pepper: str | None) -> None:
        # Without a configured pepper (the embedded memory store), a per-process one
        # is as good: the keys live no longer than the process.
        self._pepper = (pepper or secrets.token_urlsafe(32)).encode()

    def hash(self, key: str) -> str:
        return hmac.new(self._pepper, key.encode(), hashlib.sha256).hexdigest()

    def matches(self, key: str, key_hash: str) -> bool:
        return hmac.compare_digest(self.hash(key), key_hash)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def issue_key(
    hasher: KeyHasher,
    name: str,
    *,
    team: str | None = None,
    limits: Limits | None = None,
    models: tuple[str, ...] = (),
) -> tuple[str, KeyRecord]:
    """A new secret and the record to store for it; the secret is shown once."""
    secret = new_key()
    record = KeyRecord(
        id=new_key_id(),
        name=name,
        key_hash=hasher.hash(secret),
        last4=secret[-4:],
        created=int(time.time()),
        team=team,
        limits=limits or Limits(),
        models=models,
    )
    return secret, record
