"""Session cookies, CSRF tokens and the sign-in limit, with a clock the tests move."""

from __future__ import annotations

from proxy.auth import same_secret
from proxy.console.session import (
    SESSION_SECONDS,
    SIGN_IN_ATTEMPTS,
    SIGN_IN_WINDOW_SECONDS,
    Sessions,
    SignInLimiter,
)

TOKEN = "t" * 40


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_session_holds_until_it_expires_and_not_a_second_longer() -> None:
    clock = Clock()
    sessions = Sessions(TOKEN, clock=clock)
    cookie, session = sessions.issue()
    assert sessions.check(cookie) == session
    clock.now += SESSION_SECONDS - 1
    assert sessions.check(cookie) == session
    clock.now += 1
    assert sessions.check(cookie) is None


def test_another_admin_token_ends_every_session() -> None:
    cookie, _ = Sessions(TOKEN).issue()
    assert Sessions("u" * 40).check(cookie) is None


def test_a_signed_out_session_is_refused_and_others_go_on() -> None:
    sessions = Sessions(TOKEN)
    first, session = sessions.issue()
    second, _ = sessions.issue()
    sessions.end(session)
    assert sessions.check(first) is None
    assert sessions.check(second) is not None


def test_the_csrf_token_is_the_sessions_own() -> None:
    sessions = Sessions(TOKEN)
    _, one = sessions.issue()
    _, other = sessions.issue()
    assert one.csrf != other.csrf
    assert Sessions.csrf_ok(one, one.csrf)
    assert not Sessions.csrf_ok(one, other.csrf)
    assert not Sessions.csrf_ok(one, None)
    assert not Sessions.csrf_ok(one, "")


def test_failed_sign_ins_are_limited_per_address_for_a_window() -> None:
    clock = Clock(100.0)
    limiter = SignInLimiter(clock=clock)
    for _ in range(SIGN_IN_ATTEMPTS):
        assert limiter.retry_after("10.0.0.1") is None
        limiter.failed("10.0.0.1")
    wait = limiter.retry_after("10.0.0.1")
    assert wait is not None and 0 < wait <= SIGN_IN_WINDOW_SECONDS
    assert limiter.retry_after("10.0.0.2") is None  # another address is not held
    clock.now += SIGN_IN_WINDOW_SECONDS
    assert limiter.retry_after("10.0.0.1") is None


def test_the_token_comparison_matches_only_the_token() -> None:
    assert same_secret(TOKEN, TOKEN)
    assert not same_secret(TOKEN[:-1], TOKEN)
    assert not same_secret(TOKEN + "x", TOKEN)
    assert not same_secret("ü" * 40, TOKEN)
