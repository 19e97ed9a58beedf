"""Small ASGI helpers for the hot path: bounded body reads, JSON and error answers."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from .errors import BodyTooLarge, InvalidRequest, ProxyError

JSON = b"application/json"
# Enough digits for any count or length a client may mean; int() refuses past 4,300.
_DECIMAL = re.compile(r"[0-9]{1,18}")


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


# The request headers the image routes read; the rest are not kept for the call.
IMAGE_HEADERS = frozenset(
    {
        b"authorization",
        b"content-length",
        b"content-type",
        b"idempotency-key",
        b"x-stainless-retry-count",
    }
)


def header_map(scope: Scope, names: frozenset[bytes] = IMAGE_HEADERS) -> dict[str, str]:
    """The request headers in ``names``, by lower-case name (the last repeated one wins)."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in names}


@dataclass(frozen=True)
class BodyLimit:
    """The most bytes a request body may have, and where that number comes from."""

    bytes: int
    derived: str

    def refusal(self) -> BodyTooLarge:
        return BodyTooLarge(
            f"Request body is larger than the limit of {self.bytes} bytes{self.derived}."
        )


async def read_body(scope: Scope, receive: Receive, limit: BodyLimit) -> bytes:
    """The whole request body, refusing (413) as soon as it passes the limit."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise InvalidRequest("Invalid Content-Length header.") from None
            if declared > limit.bytes:
                raise limit.refusal()
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit.bytes:
            raise limit.refusal()
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def decimal(text: str) -> int | None:
    """``text`` (spaces around it aside) as a whole number if it is ASCII digits, else None.

    ``str.isdigit`` also passes "²", which ``int`` refuses, and ``int`` reads fullwidth
    or Arabic-Indic digits as numbers: in client text only ASCII digits count.
    """
    match = _DECIMAL.fullmatch(text.strip())
    return None if match is None else int(match[0])


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "The request body is not valid JSON (it must be a UTF-8 JSON object)."
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return value


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = JSON,
) -> None:
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    raw += [h for h in headers or [] if h[0] != b"content-type"]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, value: Any, headers: Mapping[str, str] | None = None
) -> None:
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send_bytes(send, status, orjson.dumps(value), extra)


async def send_error(send: Send, error: ProxyError) -> None:
    await send_bytes(send, error.status, error.body(), error.headers())
