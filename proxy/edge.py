"""The edge: how much of a connection a client may hold before it is owed an answer.

uvicorn leaves this open. Its httptools protocol keeps a request head of any size (a
64 MB header is read whole, then answered), and it starts no timer until a response is
complete: a connection that never sends, or sends its head or body a byte at a time, is
kept for ever. ``EdgeProtocol`` is that protocol with these limits (``server.*``):

- ``max_header_bytes``: the request line and headers, as sent, may take this many bytes.
  No more is fed to the parser; a head still unfinished there is answered 431 and the
  connection closed. (A pipelined head that begins in the read which ended the request
  before it counts that whole read, at most 256 KiB, against the cap: its exact start
  is not known.)
- ``head_timeout_seconds``: from the connection's start, or the first byte of the next
  request on a kept-alive one, to the end of the head; then the connection is closed.
- ``body_timeout_seconds``, plus one second for every ``body_min_bytes_per_second``
  received: from the end of the head to the end of the body. A slow but steady upload
  is read whole; a trickle is cut.
- ``max_connections``: a connection accepted over it is closed at once (clients see a
  connection error, which the SDKs retry after a pause).

Idle kept-alive connections are closed by uvicorn's own timer
(``keepalive_timeout_seconds``). No limit cuts a response under way: once its request
is read, a call lives as long as its upstream call; a limit reached while a response is
being sent (behind a pipelined request) closes the connection after that response.

Only the httptools protocol: httptools is a declared dependency, so uvicorn's h11
fallback is never chosen, and it would need hooks of its own.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .config import ServerSettings
from .errors import error_body

log = logging.getLogger("apiyi_proxy")
# Refused connections are counted always, reported at most this often.
REPORT_EVERY_SECONDS = 60.0

# What the connection waits for from the client: the head or the body of a request,
# nothing ("read": the last request is in), or nothing more ("closing").
Phase = Literal["head", "body", "read", "closing"]


@dataclass(eq=False)
class Edge:
    """One process's limits, shared by all its connections, and what they refused."""

    limits: ServerSettings
    refused: int = 0
    reported_at: float = float("-inf")

    def refuse(self, open_connections: int) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self.reported_at >= REPORT_EVERY_SECONDS:
            self.reported_at = now
            log.warning(
                "connection closed at once: %d open, the limit of server.max_connections "
                "(%d refused since start)",
                open_connections,
                self.refused,
            )


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol within the edge's limits (see the module)."""

    def __init__(self, *args: Any, edge: Edge, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.edge = edge
        self.limits = edge.limits
        self.phase: Phase = "head"
        self.head_bytes = 0
        self.body_bytes = 0
        self.body_started = 0.0
        self.feeding = 0  # bytes in the parser's current read
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.connections.discard(self)
            self.phase = "closing"
            transport.close()
            self.edge.refuse(len(self.connections))
            return
        self._expect(self.limits.head_timeout_seconds)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = "closing"
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        limit = self.limits.max_header_bytes
        while data and self.phase != "closing" and not self.transport.is_closing():
            if self.phase == "read":  # the last request is in: these bytes begin the next
                self._begin_head(0)
            if self.phase == "head":  # the parser gets no more of a head than the cap
                room = limit - self.head_bytes
                piece, data = data[:room], data[room:]
                self.head_bytes += len(piece)
            else:
                piece, data = data, b""
                if self.phase == "body":
                    self.body_bytes += len(piece)
            self.feeding = len(piece)
            super().data_received(piece)
            if self.phase == "head" and self.head_bytes >= limit:
                if not self.transport.is_closing():  # (not refused by the parser already)
                    log.info("request head over server.max_header_bytes: answered 431")
                    self._close(self._head_too_large())
                return

    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.phase == "read":  # pipelined, in the read that ended the request before:
            self._begin_head(self.feeding)  # all that read counts against this head

    def on_headers_complete(self) -> None:
        queued = self._owes_response()
        super().on_headers_complete()
        self.phase, self.body_bytes = "body", 0
        if queued:  # pipelined: uvicorn reads its body once the response before it is sent
            self._cancel()
        else:
            self._expect_body()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.phase = "read"
        self._cancel()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.phase == "body" and self.deadline is None and not self.transport.is_closing():
            self._expect_body()

    # deadlines

    def _expect(self, seconds: float) -> None:
        self._cancel()
        self.deadline = self.loop.call_later(seconds, self._expire)

    def _begin_head(self, counted: int) -> None:
        self.phase, self.head_bytes = "head", counted
        self._expect(self.limits.head_timeout_seconds)

    def _expect_body(self) -> None:
        self.body_started = self.loop.time()
        self._expect(self.limits.body_timeout_seconds)

    def _cancel(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expire(self) -> None:
        self.deadline = None
        if self.phase == "body":
            limits = self.limits
            earned = self.body_bytes / limits.body_min_bytes_per_second
            due = self.body_started + limits.body_timeout_seconds + earned
            if due > self.loop.time():
                self.deadline = self.loop.call_at(due, self._expire)
                return
        self._close()

    def _owes_response(self) -> bool:
        """A response is being sent, or queued, on this connection."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return False
        # A request still sending its body is owed nothing until its answer has begun.
        return self.phase != "body" or cycle.response_started

    def _close(self, answer: bytes = b"") -> None:
        """Close now, or after the response under way: never cut one."""
        owed = self._owes_response()
        self.phase = "closing"
        self._cancel()
        if owed:
            self.cycle.keep_alive = False
            return
        if answer:
            self.transport.write(answer)
        self.transport.close()

    def _head_too_large(self) -> bytes:
        limit = self.limits.max_header_bytes
        body = error_body(
            f"The request line and headers are larger than the limit of {limit} bytes.",
            "invalid_request_error",
            "request_header_too_large",
            None,
        )
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"x-should-retry", b"false"),
            (b"x-request-id", f"req_{secrets.token_hex(12)}".encode()),
        ]
        lines = [name + b": " + value + b"\r\n" for name, value in headers]
        return b"".join([STATUS_LINE[431], *lines, b"\r\n", body])
