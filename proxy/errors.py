"""Errors the proxy answers with, all rendered as OpenAI-shaped JSON.

    ProxyError                     status  type
    ├── InvalidRequest             400     invalid_request_error
    ├── BodyTooLarge               413     invalid_request_error
    ├── Unauthorized               401     authentication_error
    ├── Forbidden                  403     permission_error
    ├── NotFound                   404     invalid_request_error
    ├── Conflict                   409     conflict_error
    ├── IdempotencyMismatch        422     invalid_request_error
    ├── RateLimited                429     rate_limit_error
    ├── BudgetExceeded             429     insufficient_quota
    ├── StoreUnavailable           503     service_unavailable
    ├── UpstreamFailed             502     upstream_error   (or the upstream's own 4xx)
    └── UpstreamTimeout            504     upstream_timeout

Third-party exceptions (store, HTTP client) are translated into these at their
boundary; one handler renders them. ``x-should-retry`` tells OpenAI SDKs whether a
retry can help: never when a retry could be billed twice or cannot succeed.
"""

from __future__ import annotations

import math
from typing import ClassVar

import orjson


class ProxyError(Exception):
    """An error with its HTTP status, OpenAI ``type`` and ``code``."""

    status: int = 500
    type: str = "server_error"
    default_code: ClassVar[str | None] = None
    should_retry: bool | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            seconds = max(1, math.ceil(self.retry_after))
            headers.append((b"retry-after", str(seconds).encode()))
            headers.append(
                (b"retry-after-ms", str(max(1, round(self.retry_after * 1000))).encode())
            )
        if self.should_retry is not None:
            headers.append((b"x-should-retry", b"true" if self.should_retry else b"false"))
        return headers


def error_body(message: str, type_: str, code: str | None, param: str | None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"
    should_retry = False


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"
    should_retry = False


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"
    should_retry = False


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"
    default_code = "permission_denied"
    should_retry = False


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"
    should_retry = False


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"
    should_retry = False


class Conflict(ProxyError):
    status = 409
    type = "conflict_error"
    default_code = "idempotency_in_flight"
    should_retry = False


class IdempotencyMismatch(ProxyError):
    status = 422
    type = "invalid_request_error"
    default_code = "idempotency_key_reused"
    should_retry = False


class RateLimited(ProxyError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"
    should_retry = True


class BudgetExceeded(ProxyError):
    status = 429
    type = "insufficient_quota"
    default_code = "budget_exceeded"
    should_retry = False


class StoreUnavailable(ProxyError):
    status = 503
    type = "service_unavailable"
    default_code = "store_unavailable"
    should_retry = True
    # False when the failed step surely never reached the store; nothing to undo then.
    maybe_applied = True


class UpstreamFailed(ProxyError):
    """The upstream answered with an error, or with nothing usable."""

    status = 502
    type = "upstream_error"
    default_code = "upstream_error"
    should_retry = False


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_timeout"
    default_code = "upstream_timeout"
    # The upstream may have billed the call: a retry could pay twice.
    should_retry = False


class UpstreamStatus(ProxyError):
    """The upstream's own 4xx or 429, passed on with its status and a normalised body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str,
        code: str | None,
        param: str | None = None,
        retry_after: float | None = None,
        should_retry: bool = False,
    ) -> None:
        super().__init__(message, code=code, param=param, retry_after=retry_after)
        self.status = status
        self.type = type_
        self.should_retry = should_retry
