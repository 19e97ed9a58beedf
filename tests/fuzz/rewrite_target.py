"""Fuzz target: the streaming body rewriter (``proxy/rewrite.py``).

Each input is an upstream 200 body. For each set of options it is fed whole and cut
at points drawn from its hash (and a byte at a time when short); every way must
release the same bytes and end the same way, raise nothing but ``UpstreamBodyError``,
and hold no more than the bounds. When the input is strict JSON without escapes,
the result must be the reference edit of ``tests/test_rewrite.py``.
"""

from __future__ import annotations

import json
from typing import Any

import atheris

with atheris.instrument_imports(include=["proxy"]):
    from proxy.rewrite import MAX_CARRIED, MAX_DEPTH, ImagesBodyRewriter, UpstreamBodyError

from tests.fuzz import cuts
from tests.test_rewrite import PNG_B64, reference, reference_items

CREATED = 1778037127
MAX_PREAMBLE = 65536
OPTIONS = [
    {"strip_prefix": strip, "items_only": items_only}
    for strip in (True, False)
    for items_only in (False, True)
]
REASONS = {"malformed", "no_data", "error_object", "too_large_preamble"}
UNDER_TEST = ("proxy.rewrite",)

Result = tuple[bytes, str | None, object, int]


def run(chunks: list[bytes], options: dict[str, bool]) -> Result:
    """The bytes released, the refusal's reason and error, and the images counted."""
    rewriter = ImagesBodyRewriter(created=CREATED, max_preamble=MAX_PREAMBLE, **options)
    out = bytearray()
    try:
        for chunk in chunks:
            out += rewriter.feed(chunk)
            bound = MAX_CARRIED if rewriter.decided else MAX_PREAMBLE + MAX_CARRIED
            assert rewriter.held_bytes <= bound, rewriter.held_bytes
            assert rewriter.depth <= MAX_DEPTH, rewriter.depth
        out += rewriter.finish()
    except UpstreamBodyError as exc:
        assert exc.reason in REASONS, exc.reason
        return bytes(out), exc.reason, exc.error, rewriter.images
    return bytes(out), None, None, rewriter.images


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError("duplicate key")
    return dict(pairs)


def _no_constants(name: str) -> None:
    raise ValueError(name)  # NaN and Infinity: Python's json takes them, JSON does not


def strict_json(data: bytes) -> Any:
    """``data`` as strict JSON (UTF-8, no duplicate keys, no NaN), or None."""
    try:
        return json.loads(
            data.decode(), object_pairs_hook=_no_duplicates, parse_constant=_no_constants
        )
    except ValueError:
        return None


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def check_reference(body: Any, result: Result, options: dict[str, bool]) -> None:
    out, reason, error, images = result
    if not isinstance(body, dict):
        assert reason == "malformed", result
    elif depth(body) > MAX_DEPTH:
        # Refused; an error key seen before the nesting names the refusal, unread.
        assert reason in ("malformed", "error_object") and error is None, result
    elif isinstance(body.get("data"), list):
        assert reason is None, result
        assert images == len(body["data"])
        strip = options["strip_prefix"]
        if options["items_only"]:
            assert json.loads(b"[" + out + b"]") == reference_items(body, strip)
            assert (out == b"") == (not body["data"])
        else:
            assert json.loads(out) == reference(body, CREATED, strip)
    else:
        assert out == b""
        expected = body.get("error")
        assert reason == ("error_object" if "error" in body else "no_data"), result
        assert error == (expected if isinstance(expected, dict) else None), result


def test_one_input(data: bytes) -> None:
    body = strict_json(data) if b"\\" not in data else None
    for options in OPTIONS:
        whole = run([data], options)
        assert run(cuts(data), options) == whole
        if len(data) <= 256 and options is OPTIONS[0]:
            assert run([data[i : i + 1] for i in range(len(data))], options) == whole
        if body is not None and len(data) < MAX_PREAMBLE:
            check_reference(body, whole, options)


def seeds() -> list[bytes]:
    """Realistic upstream bodies, written the ways encoders write them."""
    png = PNG_B64
    url = "https://cdn.example.com/images/2026/05/06/a.png"
    usage = {"input_tokens": 12, "output_tokens": 1056, "total_tokens": 1068}
    bodies: list[Any] = [
        {"created": 1778037127, "data": [{"url": url}], "usage": usage},
        {"data": [{"b64_json": f"data:image/png;base64,{png}"}]},
        {"data": [{"b64_json": f"data:image/png;base64,{png}", "revised_prompt": "猫"}]},
        {"created": 1, "data": [{"b64_json": png}, {"url": url}], "usage": usage},
        {"usage": usage, "data": [], "background": "opaque"},
        {"data": [{"b64_json": "data:image/webp;base64,UklGR"}, {"b64_json": "data:,x"}]},
        {"error": {"message": "quota (request id: X)", "type": "new_api_error", "code": "q"}},
        {"error": "upstream failed", "created": 5},
        {"created": 1778037127},
        {"data": {"url": url}},
        [{"data": []}],
    ]
    out = []
    for body in bodies:
        out.append(json.dumps(body, separators=(",", ":")).encode())
        out.append(json.dumps(body, indent=2, ensure_ascii=False).encode())
        out.append(json.dumps(body).replace("/", "\\/").encode())  # as PHP writes it
    long_prefix = "data:" + "x" * 120 + ";base64,"
    out.append(json.dumps({"data": [{"b64_json": long_prefix + png}]}).encode())
    out.append(b'{"data":[' + b"[" * 40 + b"]" * 40 + b"]}")
    out.append(b'{"data":[{"b64_json":"data:image/png;base64,AAAA"}]')  # cut short
    return out


def prepare() -> None:
    """Nothing to set up: the rewriter is pure."""
