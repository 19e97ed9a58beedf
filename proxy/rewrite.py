"""Rewrite the upstream's images body as it streams, without ever holding it whole.

A small structural JSON scanner (not a parser): it tracks nesting, object keys and
string boundaries, jumping through long strings with a regex search, so a 20 MB
``b64_json`` costs two ``bytes.find`` calls per chunk. It changes only:

- the ``data:<mime>;base64,`` prefix at the start of each ``b64_json`` value in the
  top-level ``data`` array (dropped when ``strip_prefix``), escapes such as ``\\/``
  included;
- a missing top-level ``created`` (added before the closing brace).

Nothing is released until the top-level ``data`` array has begun: an upstream 200 that
carries ``{"error": …}`` is detected before a byte reaches the client. With
``items_only`` the output is just the array's items and the commas between them, no
whitespace, for merging several answers.

Held bytes are bounded by ``max_preamble``; after the decision at most ``MAX_CARRIED``
bytes (a partial prefix, shorter than ``MAX_PREFIX``, and the last key, cut to
``MAX_KEY + 1``) are carried between chunks. Nesting deeper than ``MAX_DEPTH`` is
malformed: every level costs memory, and no images body goes past a handful.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

MAX_PREFIX = 128  # the longest ``data:<mime>;base64,`` stripped, ``;base64,`` included
MAX_KEY = 64
MAX_DEPTH = 32
MAX_CARRIED = MAX_PREFIX + MAX_KEY
_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_SCALAR = re.compile(rb"[^,\]} \t\r\n]*")
_PREFIX_END = b";base64,"

# Scanner states.
_VALUE, _KEY_OR_END, _KEY, _COLON, _AFTER, _STRING, _SCALAR_ST, _DONE = range(8)


class UpstreamBodyError(Exception):
    """The upstream's 200 body is not a usable images response."""

    def __init__(self, reason: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


class ImagesBodyRewriter:
    def __init__(
        self,
        *,
        strip_prefix: bool = True,
        created: int,
        items_only: bool = False,
        max_preamble: int = 65536,
    ) -> None:
        self._strip = strip_prefix
        self._created = created
        self._items_only = items_only
        self._max_preamble = max_preamble
        self.decided = False
        self.images = 0
        self._out: list[bytes] = []
        self._held = 0
        self._state = _VALUE
        # Stack of containers: [is_object, current key (objects) or None].
        self._stack: list[list[Any]] = []
        self._top_keys: set[bytes] = set()
        self._in_data = False  # inside the top-level data array's brackets
        self._emit = True  # held until the decision, and kept for an error object
        self._string_kind = ""  # "key", "prefix" (a b64_json value being checked), "value"
        self._escape = False
        self._key = bytearray()
        self._prefix = bytearray()
        self._malformed = False

    @property
    def held_bytes(self) -> int:
        pending = self._held if not self.decided else 0
        return pending + len(self._prefix) + len(self._key)

    @property
    def depth(self) -> int:
        return len(self._stack)

    def _take(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        self._held = 0
        return out

    # public --------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> bytes:
        if self._malformed:
            return b""
        self._scan(chunk)
        if not self.decided:
            if self._held > self._max_preamble:
                raise UpstreamBodyError("too_large_preamble")
            return b""
        return self._take()

    def finish(self) -> bytes:
        if self._malformed or self._state != _DONE:
            if not self.decided and b"error" in self._top_keys:
                raise UpstreamBodyError("error_object", self._error_object())
            raise UpstreamBodyError("malformed")
        if not self.decided:
            if b"error" in self._top_keys:
                raise UpstreamBodyError("error_object", self._error_object())
            raise UpstreamBodyError("no_data")
        return self._take()

    def _error_object(self) -> dict[str, Any] | None:
        try:
            value = orjson.loads(b"".join(self._out))
        except orjson.JSONDecodeError:
            return None
        error = value.get("error") if isinstance(value, dict) else None
        return error if isinstance(error, dict) else None

    # scanning ------------------------------------------------------------------------
    def _put(self, data: bytes) -> None:
        if self._emit and data:
            self._out.append(data)
            self._held += len(data)

    def _scan(self, buf: bytes) -> None:
        i, n = 0, len(buf)
        while i < n:
            state = self._state
            if state == _STRING:
                i = self._scan_string(buf, i)
                continue
            if state == _SCALAR_ST:
                end = _SCALAR.match(buf, i).end()  # type: ignore[union-attr]
                self._put(buf[i:end])
                i = end
                if i < n:
                    self._state = _AFTER
                continue
            end = _WHITESPACE.match(buf, i).end()  # type: ignore[union-attr]
            if end > i:
                if not (self._items_only and self._in_data and len(self._stack) == 2):
                    self._put(buf[i:end])
                i = end
                continue
            c = buf[i]
            if state == _DONE:
                self._malformed = True
                return
            if state == _VALUE:
                self._start_value(c)
                if self._malformed:
                    return
                i += 1
            elif state in (_KEY_OR_END, _KEY):
                if c == 0x22:  # "
                    self._put(b'"')
                    self._state, self._string_kind, self._escape = _STRING, "key", False
                    self._key.clear()
                elif c == 0x7D and state == _KEY_OR_END:  # }
                    self._close(c)
                else:
                    self._malformed = True
                    return
                i += 1
            elif state == _COLON:
                if c != 0x3A:
                    self._malformed = True
                    return
                self._put(b":")
                self._state = _VALUE
                i += 1
            else:  # _AFTER
                if c == 0x2C:  # ,
                    self._put(b",")
                    top = self._stack[-1]
                    self._state = _KEY if top[0] else _VALUE
                elif c in (0x7D, 0x5D):
                    self._close(c)
                else:
                    self._malformed = True
                    return
                if self._malformed:
                    return
                i += 1

    def _start_value(self, c: int) -> None:
        depth = len(self._stack)
        if depth == 0 and c != 0x7B:
            self._malformed = True  # the body must be a JSON object
            return
        if c == 0x5D and not self._stack[-1][0]:  # ] closing an empty array
            self._close(c)
            return
        if depth == 2 and self._in_data:
            self.images += 1
        top_key = self._stack[0][1] if depth == 1 else None
        if c in (0x7B, 0x5B) and depth >= MAX_DEPTH:
            self._malformed = True
            return
        if c == 0x7B:  # {
            self._put(b"{")
            self._stack.append([True, None])
            self._state = _KEY_OR_END
        elif c == 0x5B:  # [
            self._put(b"[")
            self._stack.append([False, None])
            self._state = _VALUE
            # Only the first: with items_only, a second would drop what the first left
            # unreleased in this chunk (and a body has one data array).
            if top_key == b"data" and not self.decided:
                self._in_data = True
                self.decided = True
                if self._items_only:
                    self._take()
        elif c == 0x22:  # "
            self._put(b'"')
            self._state, self._escape = _STRING, False
            is_b64 = depth == 3 and self._in_data and self._stack[-1][1] == b"b64_json"
            self._string_kind = "prefix" if is_b64 and self._strip else "value"
            self._prefix.clear()
        else:
            self._put(bytes((c,)))
            self._state = _SCALAR_ST

    def _close(self, c: int) -> None:
        if not self._stack or self._stack[-1][0] != (c == 0x7D):
            self._malformed = True
            return
        depth = len(self._stack)
        if depth == 2 and self._in_data and c == 0x5D:
            self._in_data = False
            if self._items_only:
                self._emit = False
        if depth == 1 and not self._items_only and b"created" not in self._top_keys:
            comma = b"," if self._top_keys else b""
            self._put(comma + b'"created":%d' % self._created)
        self._put(b"}" if c == 0x7D else b"]")
        self._stack.pop()
        self._state = _AFTER if self._stack else _DONE

    def _scan_string(self, buf: bytes, i: int) -> int:
        n = len(buf)
        if self._escape:
            self._string_bytes(buf[i : i + 1])
            self._escape = False
            i += 1
        while i < n:
            # memchr-speed searches: base64 has neither quotes nor backslashes.
            quote = buf.find(b'"', i)
            end = n if quote < 0 else quote
            backslash = buf.find(b"\\", i, end)
            if backslash >= 0:  # it and the next byte are string content
                self._string_bytes(buf[i : backslash + 2])
                if backslash + 1 >= n:
                    self._escape = True
                i = backslash + 2
                continue
            self._string_bytes(buf[i:end])
            if quote < 0:
                return n
            self._end_string()
            return quote + 1
        return i

    def _string_bytes(self, data: bytes) -> None:
        kind = self._string_kind
        if kind == "value":
            self._put(data)
        elif kind == "key":
            # Longer keys are cut to MAX_KEY + 1 bytes: still unequal to every key looked for.
            self._key += data[: MAX_KEY + 1 - len(self._key)]
            self._put(data)
        else:
            self._prefix += data
            self._check_prefix(final=False)

    def _check_prefix(self, *, final: bool) -> None:
        p = self._prefix
        if not (b"data:".startswith(p) if len(p) < 5 else p.startswith(b"data:")):
            return self._give_up_prefix()
        end = p.find(_PREFIX_END, 0, MAX_PREFIX)
        if end >= 0:
            self._put(bytes(p[end + len(_PREFIX_END) :]))
            self._prefix.clear()
            self._string_kind = "value"
        elif final or len(p) >= MAX_PREFIX:
            self._give_up_prefix()
        return None

    def _give_up_prefix(self) -> None:
        self._put(bytes(self._prefix))
        self._prefix.clear()
        self._string_kind = "value"

    def _end_string(self) -> None:
        if self._string_kind == "prefix":
            self._check_prefix(final=True)
        self._put(b'"')
        if self._string_kind == "key":
            key = bytes(self._key)
            self._stack[-1][1] = key
            if len(self._stack) == 1:
                self._top_keys.add(key)
            self._state = _COLON
        else:
            self._state = _AFTER
        self._string_kind = ""
