"""The console's sign-in: signed session cookies, CSRF tokens, and a limit on attempts.

A session is a cookie ``v1.<expiry>.<nonce>.<signature>`` signed with a key derived from
the admin token, so every replica accepts it, no store is needed, and changing the token
ends every session. The CSRF token of a session is derived from its nonce: a form carries
it, and a state-changing request without it (or with another session's) is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "apiyi_console"
SESSION_SECONDS = 8 * 3600
SIGN_IN_ATTEMPTS = 5  # failed sign-ins an address may make a window
SIGN_IN_WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: int
    csrf: str


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Sessions:
    """Issues and checks session cookies and their CSRF tokens."""

    def __init__(self, admin_token: str, *, clock: Callable[[], float] = time.time) -> None:
        self._key = hmac.new(
            admin_token.encode(), b"apiyi-proxy console session v1", hashlib.sha256
        ).digest()
        self._clock = clock
        # Signed out before they expired: refused by this process until then.
        self._ended: dict[str, int] = {}

    def _sign(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())

    def _csrf(self, nonce: str) -> str:
        return self._sign(f"csrf.{nonce}")

    def issue(self) -> tuple[str, Session]:
        """A new session: the cookie's value and what it stands for."""
        nonce = secrets.token_urlsafe(18)
        expires = int(self._clock()) + SESSION_SECONDS
        body = f"v1.{expires}.{nonce}"
        return f"{body}.{self._sign(body)}", Session(nonce, expires, self._csrf(nonce))

    def check(self, cookie: str | None) -> Session | None:
        """The session ``cookie`` stands for, or None if it is forged, expired or ended."""
        if not cookie or len(cookie) > 200:
            return None
        parts = cookie.split(".")
        if len(parts) != 4 or parts[0] != "v1" or not parts[1].isdigit():
            return None
        body = ".".join(parts[:3])
        if not hmac.compare_digest(self._sign(body), parts[3]):
            return None
        expires, nonce = int(parts[1]), parts[2]
        now = self._clock()
        if expires <= now or nonce in self._ended:
            return None
        return Session(nonce, expires, self._csrf(nonce))

    def end(self, session: Session) -> None:
        now = self._clock()
        self._ended = {n: e for n, e in self._ended.items() if e > now}
        self._ended[session.nonce] = session.expires

    @staticmethod
    def csrf_ok(session: Session, sent: str | None) -> bool:
        return sent is not None and hmac.compare_digest(session.csrf, sent)


class SignInLimiter:
    """At most ``SIGN_IN_ATTEMPTS`` failed sign-ins per client address in any
    ``SIGN_IN_WINDOW_SECONDS``; past that, every attempt is refused until the window
    has moved on, the right token too."""

    def __init__(
        self,
        attempts: int = SIGN_IN_ATTEMPTS,
        window: float = SIGN_IN_WINDOW_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._attempts = attempts
        self._window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or None if it may now."""
        failures = self._recent(address)
        if len(failures) < self._attempts:
            return None
        return max(1.0, failures[0] + self._window - self._clock())

    def failed(self, address: str) -> None:
        now = self._clock()
        self._recent(address).append(now)
        if len(self._failures) > 10_000:  # many addresses: forget the quiet ones
            quiet = [a for a, f in self._failures.items() if f[-1] <= now - self._window]
            for address in quiet:
                del self._failures[address]

    def _recent(self, address: str) -> deque[float]:
        failures = self._failures.setdefault(address, deque())
        while failures and failures[0] <= self._clock() - self._window:
            failures.popleft()
        return failures
