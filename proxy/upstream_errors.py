"""Translate the upstream's error answers into the proxy's (SPEC section 6).

The upstream's message is kept (it helps the caller), but never its address or the
proxy's upstream key; its error about the proxy's own key or account becomes a 502
that names neither.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from .errors import ProxyError, UpstreamFailed, UpstreamStatus

QUOTA_CODES = frozenset({"insufficient_user_quota", "insufficient_quota", "quota_exceeded"})
# A passthrough caller's own key refused by the upstream (any 401; a 403 only with this
# code, as a 403 is otherwise about quota or permissions of a real key) is answered
# with this code whatever the upstream wrote, so the proxy can act on it (``key_refused``).
KEY_REFUSED = "invalid_api_key"
DEFAULT_RETRY_AFTER = 5.0
_URL = re.compile(r"https?://[^\s\"'<>]+")


def parse_error(body: bytes) -> dict[str, Any]:
    """The upstream's ``error`` object, or an empty dict for anything else."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    if isinstance(value, dict) and isinstance(value.get("error"), dict):
        error: dict[str, Any] = value["error"]
        return error
    return {}


def clean_message(message: object, secrets: tuple[str, ...]) -> str:
    text = message if isinstance(message, str) else ""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _URL.sub("<upstream>", text)
    return text[:1000]


def retry_after_of(headers: dict[str, str]) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None


def upstream_error(
    status: int,
    body: bytes,
    headers: dict[str, str],
    *,
    passthrough: bool,
    secrets: tuple[str, ...],
) -> ProxyError:
    """The error to answer for an upstream non-200 answer."""
    error = parse_error(body)
    code = error.get("code") if isinstance(error.get("code"), str) else None
    message = clean_message(error.get("message"), secrets) or f"Upstream answered {status}."
    param = error.get("param") if isinstance(error.get("param"), str) and error["param"] else None
    quota = code in QUOTA_CODES
    if not passthrough and (status in (401, 403) or quota):
        # About the proxy's own upstream key or account: the caller can do nothing.
        what = "quota is exhausted" if quota else "credentials were refused"
        return UpstreamFailed(
            f"The proxy's upstream {what}; the operator has been alerted.",
            code="upstream_quota_exhausted" if quota else "upstream_auth_failed",
        )
    if status == 401 or (status == 403 and code == KEY_REFUSED):
        code = KEY_REFUSED  # the caller's own key (passthrough)
    if status >= 500:
        return _retryable_5xx(message)
    if status == 429:
        if quota:
            return UpstreamStatus(429, message, type_="insufficient_quota", code=code)
        return UpstreamStatus(
            429,
            message,
            type_="rate_limit_error",
            code=code or "rate_limit_exceeded",
            retry_after=retry_after_of(headers) or DEFAULT_RETRY_AFTER,
            should_retry=True,
        )
    type_ = {401: "authentication_error", 403: "permission_error"}.get(
        status, "invalid_request_error"
    )
    if code == "moderation_blocked" or status == 451:
        type_ = "invalid_request_error"
    if 400 <= status < 500:
        return UpstreamStatus(status, message, type_=type_, code=code, param=param)
    return UpstreamFailed(f"Upstream answered with unexpected status {status}.")


def key_refused(error: ProxyError) -> bool:
    """True if ``error`` is the upstream refusing a passthrough caller's own key."""
    return isinstance(error, UpstreamStatus) and error.code == KEY_REFUSED


def _retryable_5xx(message: str) -> ProxyError:
    error = UpstreamFailed(f"The upstream failed: {message}")
    # A 5xx answer was not billed, so an SDK retry cannot pay twice.
    error.should_retry = True
    return error
