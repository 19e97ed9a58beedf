"""Upstream error answers → the proxy's errors (SPEC section 6)."""

from __future__ import annotations

import orjson
import pytest

from proxy.errors import Unauthorized
from proxy.upstream_errors import key_refused, upstream_error

SECRETS = ("upstream-secret", "https://api.apiyi.com/v1")


def body(message: str, code: str | None = None, type_: str = "new_api_error") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": "", "code": code}})


def mapped(status: int, raw: bytes, passthrough: bool = False, **headers: str) -> dict:  # type: ignore[type-arg]
    error = upstream_error(status, raw, headers, passthrough=passthrough, secrets=SECRETS)
    return {
        "status": error.status,
        "body": orjson.loads(error.body())["error"],
        "headers": {k.decode(): v.decode() for k, v in error.headers()},
    }


def test_4xx_keeps_status_and_is_not_retried() -> None:
    m = mapped(400, body("bad size (request id: abc)", "invalid_size"))
    assert m["status"] == 400
    assert m["body"]["code"] == "invalid_size"
    assert m["body"]["type"] == "invalid_request_error"
    assert m["body"]["param"] is None
    assert m["headers"]["x-should-retry"] == "false"


def test_moderation_451_keeps_status() -> None:
    m = mapped(451, body("blocked", "moderation_blocked"))
    assert (m["status"], m["body"]["code"]) == (451, "moderation_blocked")
    assert m["headers"]["x-should-retry"] == "false"


@pytest.mark.parametrize("status", [401, 403])
def test_own_key_refused_is_502_naming_no_key(status: int) -> None:
    m = mapped(status, body("invalid token upstream-secret at https://api.apiyi.com/v1"))
    assert m["status"] == 502 and m["body"]["code"] == "upstream_auth_failed"
    assert "upstream-secret" not in str(m) and "apiyi.com" not in str(m)


def test_quota_is_502_in_keys_mode_and_passes_in_passthrough() -> None:
    for status in (403, 429):
        m = mapped(status, body("quota", "insufficient_user_quota"))
        assert (m["status"], m["body"]["code"]) == (502, "upstream_quota_exhausted")
    m = mapped(403, body("quota", "insufficient_user_quota"), passthrough=True)
    assert m["status"] == 403


def test_429_busy_carries_retry_after() -> None:
    m = mapped(429, body("busy", None, "rate_limit_error"), **{"retry-after": "7"})
    assert m["status"] == 429 and m["body"]["type"] == "rate_limit_error"
    assert m["headers"]["retry-after"] == "7"
    assert m["headers"]["x-should-retry"] == "true"
    assert mapped(429, b"not json")["headers"]["retry-after"] == "5"


def test_5xx_is_502_and_may_be_retried() -> None:
    m = mapped(503, b"<html>oops</html>")
    assert m["status"] == 502 and m["headers"]["x-should-retry"] == "true"


def test_messages_never_carry_secrets_or_addresses() -> None:
    m = mapped(400, body("see https://api.apiyi.com/v1/x with upstream-secret"), passthrough=True)
    assert "upstream-secret" not in m["body"]["message"]
    assert "apiyi.com" not in m["body"]["message"]


@pytest.mark.parametrize(
    ("status", "raw"),
    [
        (401, body("Invalid token", "invalid_api_key")),
        (401, body("token expired (request id: abc)")),
        (401, body("bad", "some_code_of_its_own")),
        (401, b"<html>no</html>"),
        (403, body("key disabled", "invalid_api_key")),
    ],
)
def test_a_refused_passthrough_key_has_one_fixed_code(status: int, raw: bytes) -> None:
    error = upstream_error(status, raw, {}, passthrough=True, secrets=SECRETS)
    assert key_refused(error)
    assert (error.status, error.code) == (status, "invalid_api_key")
    m = mapped(status, raw, passthrough=True)
    assert m["headers"]["x-should-retry"] == "false"


@pytest.mark.parametrize(
    ("status", "raw", "passthrough"),
    [
        (403, body("user quota is not enough", "insufficient_user_quota"), True),
        (403, body("this token may not use the model"), True),
        (400, body("bad size", "invalid_size"), True),
        (401, body("Invalid token", "invalid_api_key"), False),  # the proxy's own key
    ],
)
def test_other_answers_do_not_refuse_the_key(status: int, raw: bytes, passthrough: bool) -> None:
    error = upstream_error(status, raw, {}, passthrough=passthrough, secrets=SECRETS)
    assert not key_refused(error)


def test_the_proxys_own_401_is_not_an_upstream_refusal() -> None:
    assert not key_refused(Unauthorized("Incorrect API key provided."))
