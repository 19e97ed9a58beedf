"""Translate the upstream's error answers into the proxy's (SPEC section 6).

The upstream's message is kept (it helps the caller), scrubbed of its address, the
proxy's upstream key and anything shaped like a secret; its ``code`` and ``param`` pass
only from fixed vocabularies and its ``type`` never (the proxy picks one from the
status). Its error about the proxy's own key or account becomes a 502 that names
neither. Each answer also gets its ``UpstreamOutcome``, so that a quota or key refusal
(the operator's to fix) is counted apart from a caller's bad request.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

import orjson

from .errors import ProxyError, UpstreamFailed, UpstreamStatus
from .metrics import UpstreamOutcome

if TYPE_CHECKING:
    from .config import Settings

QUOTA_CODES = frozenset({"insufficient_user_quota", "insufficient_quota", "quota_exceeded"})
# A passthrough caller's own key refused by the upstream (any 401; a 403 only with this
# code, as a 403 is otherwise about quota or permissions of a real key) is answered
# with this code whatever the upstream wrote, so the proxy can act on it (``key_refused``).
KEY_REFUSED = "invalid_api_key"
# The upstream's codes that reach the caller (and the access log and the rejection
# metric); any other becomes ``UNKNOWN_CODE``. Upstream text is untrusted: a code is
# a label, and a label from outside would be unbounded and could carry a secret.
KNOWN_CODES = QUOTA_CODES | {
    KEY_REFUSED,
    "billing_hard_limit_reached",
    "content_policy_violation",
    "image_generation_user_error",
    "invalid_image",
    "invalid_image_format",
    "invalid_request",
    "invalid_size",
    "invalid_value",
    "missing_required_parameter",
    "model_not_found",
    "moderation_blocked",
    "prompt_blocked",
    "rate_limit_exceeded",
    "sensitive_words_detected",
    "unknown_parameter",
    "unsupported_parameter",
}
UNKNOWN_CODE = "upstream_error"
# The proxy's own codes for the upstream refusing its key or account (keys mode).
QUOTA_EXHAUSTED = "upstream_quota_exhausted"
AUTH_FAILED = "upstream_auth_failed"
# The request fields an upstream error may point at as its ``param``.
KNOWN_PARAMS = frozenset(
    {"model", "prompt", "size", "response_format", "n", "image", "image[]", "mask", "user"}
)
DEFAULT_RETRY_AFTER = 5.0
MESSAGE_LIMIT = 1000
HIDDEN = "***"
ADDRESS = "<upstream>"
# What is scrubbed from upstream text besides the exact secrets the proxy knows: URLs,
# host:port and IP addresses, bearer credentials, and anything shaped like a key or a
# long random token.
_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s\"'<>]+", re.IGNORECASE)
_BEARER = re.compile(r"\b(bearer|basic|token)(\s*[:=]?\s*)[^\s\"',;]+", re.IGNORECASE)
_KEY_SHAPED = re.compile(r"\b(sk|pk|rk|key|tok)[-_][A-Za-z0-9_-]{6,}", re.IGNORECASE)
_TOKEN = re.compile(r"[A-Za-z0-9+/_=-]{32,}")
_IP_LIKE = re.compile(r"\[?[0-9a-f:.]*[:.][0-9a-f:.]+\]?(?::[0-9]{1,5})?", re.IGNORECASE)
_HOST = re.compile(r"\b(?:[a-z0-9-]+\.)+[a-z][a-z0-9-]*(?::[0-9]{1,5})?\b", re.IGNORECASE)
_LOCALHOST = re.compile(r"\blocalhost(?::[0-9]{1,5})?\b", re.IGNORECASE)
_HOST_TLDS = frozenset(
    "com net org io cn ai dev app cloud internal local lan corp svc cluster localdomain".split()
)


def _address_or_text(match: re.Match[str]) -> str:
    """An IP address (with or without a port) becomes ``ADDRESS``; times and versions stay."""
    found = match[0].rstrip(":.")
    rest = match[0][len(found) :]
    bracketed = found.partition("]")[0].lstrip("[")
    for value in (found, found.rpartition(":")[0], bracketed):
        try:
            ipaddress.ip_address(value)
        except ValueError:
            continue
        return ADDRESS + rest
    return match[0]


def _host_or_text(match: re.Match[str]) -> str:
    """A host name (two dots, a known top-level name, or a port) becomes ``ADDRESS``."""
    name, _, port = match[0].partition(":")
    if port or name.count(".") >= 2 or name.rpartition(".")[2].lower() in _HOST_TLDS:
        return ADDRESS
    return match[0]


class Scrubber:
    """Removes the upstream's key, its address and anything secret-shaped from text.

    Built once per forwarder with what the proxy knows (the upstream key, its base URL
    and host); a passthrough caller's own key is added per call.
    """

    def __init__(self, secrets: tuple[str | None, ...] = (), addresses: tuple[str, ...] = ()):
        self._secrets = tuple(s for s in secrets if s)
        # The proxy's own upstream address, with or without a port (compiled once).
        self._addresses = tuple(
            re.compile(re.escape(a) + r"(?::[0-9]{1,5})?", re.IGNORECASE) for a in addresses if a
        )

    def text(self, value: object, extra: tuple[str | None, ...] = ()) -> str:
        text = value if isinstance(value, str) else ""
        # Before any truncation, so a secret cut in half is still found whole.
        for secret in (*self._secrets, *(s for s in extra if s)):
            text = text.replace(secret, HIDDEN)
        text = _URL.sub(ADDRESS, text)
        for address in self._addresses:
            text = address.sub(ADDRESS, text)
        text = _BEARER.sub(lambda m: m[1] + m[2] + HIDDEN, text)
        text = _KEY_SHAPED.sub(HIDDEN, text)
        text = _TOKEN.sub(HIDDEN, text)
        text = _IP_LIKE.sub(_address_or_text, text)
        text = _HOST.sub(_host_or_text, text)
        text = _LOCALHOST.sub(ADDRESS, text)
        return text[:MESSAGE_LIMIT]


def scrubber(settings: Settings) -> Scrubber:
    """The scrubber for one proxy: its upstream key, base URL and host are hidden."""
    base = urlsplit(settings.upstream.base_url)
    return Scrubber(
        (settings.upstream.api_key, settings.upstream.base_url),
        tuple(x for x in (base.netloc, base.hostname) if x),
    )


def known_code(value: object) -> str | None:
    """The upstream's code if it is one the proxy passes on, else ``UNKNOWN_CODE``."""
    if value is None or value == "":
        return None
    return value if isinstance(value, str) and value in KNOWN_CODES else UNKNOWN_CODE


def known_param(value: object) -> str | None:
    return value if isinstance(value, str) and value in KNOWN_PARAMS else None


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


def retry_after_of(headers: dict[str, str]) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None


class Answered(NamedTuple):
    """An upstream error answer: the error to send, and the call's outcome."""

    error: ProxyError
    outcome: UpstreamOutcome


def upstream_error(
    status: int,
    body: bytes,
    headers: dict[str, str],
    *,
    scrub: Scrubber,
    caller_key: str | None = None,
) -> Answered:
    """The error to answer for an upstream non-200 answer, and what the answer was.

    ``caller_key`` is a passthrough caller's own upstream key (None in keys mode).
    Every field is rebuilt: the message scrubbed, the code and param only from the
    proxy's vocabularies, the type chosen by the proxy from the status.
    """
    error = _error(status, body, headers, scrub, caller_key)
    return Answered(error, _outcome(status, error))


def _outcome(status: int, error: ProxyError) -> UpstreamOutcome:
    if error.code == QUOTA_EXHAUSTED:
        return UpstreamOutcome.QUOTA
    if error.code == AUTH_FAILED:
        return UpstreamOutcome.AUTH
    if status >= 500:
        return UpstreamOutcome.ERROR
    if error.type == "rate_limit_error":
        return UpstreamOutcome.RATE_LIMITED
    return UpstreamOutcome.REFUSED


def _error(
    status: int, body: bytes, headers: dict[str, str], scrub: Scrubber, caller_key: str | None
) -> ProxyError:
    passthrough = caller_key is not None
    error = parse_error(body)
    code = known_code(error.get("code"))
    message = scrub.text(error.get("message"), (caller_key,)) or f"Upstream answered {status}."
    param = known_param(error.get("param"))
    quota = code in QUOTA_CODES
    if not passthrough and (status in (401, 403) or quota):
        # About the proxy's own upstream key or account: the caller can do nothing.
        if quota:
            return UpstreamFailed(
                "The proxy's upstream account is out of quota; the proxy's operator has to "
                "top it up.",
                code=QUOTA_EXHAUSTED,
            )
        return UpstreamFailed(
            "The proxy's upstream credentials were refused; the proxy's operator has to fix them.",
            code=AUTH_FAILED,
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
            code="rate_limit_exceeded",
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
