"""The streaming body rewriter, in-process: examples, then properties over any bytes.

The reference for a valid body is the same edit made with a JSON parser: drop the
``data:<mime>;base64,`` prefix of each ``b64_json`` in the top-level ``data`` items,
add ``created`` when it is missing. Bodies are written out by an encoder of this file
that varies whitespace, key order and string escapes the ways JSON encoders do, and cut
into chunks anywhere.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import random
import string
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.rewrite import MAX_CARRIED, MAX_DEPTH, MAX_PREFIX, ImagesBodyRewriter, UpstreamBodyError

CREATED = 1778037127
PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(48))).decode()
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cut(raw: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``raw`` split at the given offsets (taken modulo its length, in order)."""
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    return [raw[a:b] for a, b in itertools.pairwise(points)]


def rewrite(
    chunks: Iterable[bytes], *, max_preamble: int = 65536, **options: Any
) -> tuple[bytes, ImagesBodyRewriter]:
    """Feed ``chunks`` through a rewriter, checking what it holds after each one."""
    options.setdefault("created", CREATED)
    rewriter = ImagesBodyRewriter(max_preamble=max_preamble, **options)
    out = bytearray()
    for chunk in chunks:
        out += rewriter.feed(chunk)
        assert_bounded(rewriter, max_preamble)
    out += rewriter.finish()
    return bytes(out), rewriter


def assert_bounded(rewriter: ImagesBodyRewriter, max_preamble: int) -> None:
    if rewriter.decided:
        assert rewriter.held_bytes <= MAX_CARRIED
    else:
        assert rewriter.held_bytes <= max_preamble + MAX_CARRIED
    assert rewriter.depth <= MAX_DEPTH


def outcome(chunks: Iterable[bytes], **options: Any) -> tuple[bytes, str | None]:
    """All the bytes released, and the reason the body was refused (None if it was not)."""
    options.setdefault("created", CREATED)
    rewriter = ImagesBodyRewriter(**options)
    out = bytearray()
    try:
        for chunk in chunks:
            out += rewriter.feed(chunk)
            assert_bounded(rewriter, options.get("max_preamble", 65536))
        out += rewriter.finish()
    except UpstreamBodyError as exc:
        return bytes(out), exc.reason
    return bytes(out), None


# The reference ---------------------------------------------------------------------


def without_prefix(value: str) -> str:
    """``value`` without a ``data:<mime>;base64,`` prefix of at most ``MAX_PREFIX`` bytes
    (as UTF-8; the bodies here write the prefixes that long without escapes)."""
    end = value.find(";base64,") + len(";base64,")
    if not value.startswith("data:") or end < len(";base64,"):
        return value
    return value[end:] if len(value[:end].encode()) <= MAX_PREFIX else value


def reference_items(body: dict[str, Any], strip: bool) -> list[Any]:
    items: list[Any] = copy.deepcopy(body["data"])
    for item in items:
        if strip and isinstance(item, dict) and isinstance(item.get("b64_json"), str):
            item["b64_json"] = without_prefix(item["b64_json"])
    return items


def reference(body: dict[str, Any], created: int, strip: bool) -> dict[str, Any]:
    expected = dict(body)
    expected["data"] = reference_items(body, strip)
    expected.setdefault("created", created)
    return expected


# An encoder that writes JSON the ways encoders do ----------------------------------

WHITESPACE = st.sampled_from(["", "", "", " ", "\n", "\n    ", "\t", "\r\n  "])
# plain: UTF-8 as is; ascii: \uXXXX past ASCII; slash: also \/ (PHP); every: all \uXXXX.
STYLES = st.sampled_from(["plain", "ascii", "slash", "every"])


def escape(text: str, style: str) -> str:
    if style == "plain":
        return json.dumps(text, ensure_ascii=False)[1:-1]
    if style == "every":
        units = text.encode("utf-16-be")
        return "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))
    escaped = json.dumps(text)[1:-1]
    return escaped.replace("/", "\\/") if style == "slash" else escaped


def escape_b64_json(value: str, style: str) -> str:
    """A ``b64_json`` value; ``data:`` and ``;base64,`` stay literal, as every encoder
    writes them (the rewriter matches the prefix on the JSON text)."""
    end = value.find(";base64,")
    if not value.startswith("data:") or end < 0:
        return escape(value, "plain" if style == "every" else style)
    mime = value[5:end]
    # A long prefix is written plainly, so that its length is the one the bound sees.
    mime_style = style if len(mime) <= 15 else "plain"
    return "data:" + escape(mime, mime_style) + ";base64," + escape(value[end + 8 :], style)


@st.composite
def encoded(draw: st.DrawFn, value: Any, path: tuple[object, ...] = ()) -> str:
    ws = draw(WHITESPACE)
    if isinstance(value, dict):
        pairs = draw(st.permutations(list(value.items())))
        parts = []
        for key, item in pairs:
            key_text = escape(key, draw(STYLES.filter(lambda s: s != "every")))
            parts.append(
                f'{draw(WHITESPACE)}"{key_text}"{draw(WHITESPACE)}:{draw(WHITESPACE)}'
                + draw(encoded(item, (*path, key)))
            )
        return ws + "{" + ",".join(parts) + draw(WHITESPACE) + "}"
    if isinstance(value, list):
        items = [draw(encoded(item, (*path, i))) for i, item in enumerate(value)]
        return ws + "[" + ",".join(items) + draw(WHITESPACE) + "]"
    if isinstance(value, str):
        style = draw(STYLES)
        in_item = len(path) == 3 and path[0] == "data" and path[2] == "b64_json"
        text = escape_b64_json(value, style) if in_item else escape(value, style)
        return f'{ws}"{text}"{draw(WHITESPACE)}'
    return ws + json.dumps(value) + draw(WHITESPACE)


# Realistic upstream bodies ---------------------------------------------------------


def payload(seed: int, size: int) -> str:
    return base64.b64encode(random.Random(seed).randbytes(size)).decode()


PAYLOADS = st.builds(payload, st.integers(0, 2**16), st.sampled_from([0, 3, 40, 300, 6000]))
MIMES = st.sampled_from(["image/png", "image/jpeg", "image/webp"]) | st.text(
    alphabet=string.ascii_letters + string.digits + "/+.-", max_size=15
)
LONG_MIMES = st.integers(100, 125).map(lambda n: "image/" + "x" * (n - 6))
B64_VALUES = st.one_of(
    PAYLOADS,
    st.builds(lambda m, p: f"data:{m};base64,{p}", MIMES | LONG_MIMES, PAYLOADS),
    st.builds(lambda m, p: f"data:{m},{p}", MIMES, PAYLOADS),
    st.sampled_from(["", "d", "dat", "data:", "data:image/png;base64,", "data:;base64,"]),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
URLS = st.sampled_from(
    [
        "https://cdn.example.com/images/2026/05/a.png",
        "https://example.com/i.png?sig=a%2Fb&x=<1>",
        f"data:image/png;base64,{PNG_B64}",
    ]
)
ITEM_EXTRAS = st.dictionaries(
    st.sampled_from(["revised_prompt", "index", "meta", "url_expires"]) | st.text(max_size=8),
    ANY_JSON,
    max_size=2,
)
IMAGE_ITEMS = st.one_of(
    st.fixed_dictionaries({"url": URLS}),
    st.fixed_dictionaries({"b64_json": B64_VALUES}),
    st.fixed_dictionaries({"b64_json": B64_VALUES}, optional={"revised_prompt": st.text()}),
).flatmap(lambda item: ITEM_EXTRAS.map(lambda extra: {**extra, **item}))
ITEMS = IMAGE_ITEMS | ANY_JSON
USAGE = st.fixed_dictionaries(
    {"total_tokens": st.integers(0, 10**6)},
    optional={
        "input_tokens": st.integers(0, 10**6),
        "output_tokens": st.integers(0, 10**6),
        "input_tokens_details": st.fixed_dictionaries(
            {"text_tokens": st.integers(0, 10**4), "image_tokens": st.integers(0, 10**4)}
        ),
    },
)
TOP_EXTRAS = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k not in ("data", "created", "error")),
    ANY_JSON,
    max_size=2,
)
BODIES = st.fixed_dictionaries(
    {"data": st.lists(ITEMS, max_size=4)},
    optional={
        "created": st.integers(0, 2**40),
        "usage": USAGE,
        "background": st.sampled_from(["opaque", "transparent"]),
        "output_format": st.just("png"),
    },
).flatmap(lambda body: TOP_EXTRAS.map(lambda extra: {**extra, **body}))
CUTS = st.lists(st.integers(0, 2**20), max_size=12)


# Examples --------------------------------------------------------------------------


def test_the_prefix_of_b64_json_is_stripped() -> None:
    body = b'{"data":[{"b64_json":"data:image/png;base64,iVBOR"}]}'
    out, rewriter = rewrite([body])
    assert out == b'{"data":[{"b64_json":"iVBOR"}],"created":%d}' % CREATED
    assert rewriter.images == 1


def test_keep_leaves_the_prefix() -> None:
    body = b'{"created":1,"data":[{"b64_json":"data:image/png;base64,iVBOR"}]}'
    assert rewrite([body], strip_prefix=False)[0] == body


def test_created_is_added_only_when_missing() -> None:
    assert rewrite([b'{"data":[]}'])[0] == b'{"data":[],"created":%d}' % CREATED
    assert rewrite([b'{"created":5,"data":[]}'])[0] == b'{"created":5,"data":[]}'
    assert rewrite([b'{"data":[] }\n'])[0] == b'{"data":[] ,"created":%d}\n' % CREATED


def test_an_escaped_slash_in_the_prefix_is_stripped() -> None:
    body = b'{"data":[{"b64_json":"data:image\\/png;base64,iVB\\/OR"}]}'
    assert orjson_items(rewrite([body])[0]) == [{"b64_json": "iVB/OR"}]


def test_the_prefix_bound_counts_the_whole_prefix() -> None:
    for length, stripped in ((MAX_PREFIX, True), (MAX_PREFIX + 1, False)):
        prefix = "data:" + "x" * (length - len("data:;base64,")) + ";base64,"
        assert len(prefix) == length
        body = json.dumps({"data": [{"b64_json": prefix + "iVBOR"}]}).encode()
        for chunks in ([body], [bytes((b,)) for b in body]):
            expected = "iVBOR" if stripped else prefix + "iVBOR"
            assert orjson_items(rewrite(chunks)[0]) == [{"b64_json": expected}]


def test_only_b64_json_of_the_data_items_is_rewritten() -> None:
    value = f"data:image/png;base64,{PNG_B64}"
    body = {
        "b64_json": value,
        "data": [{"url": value, "meta": {"b64_json": value}}, value, [{"b64_json": value}]],
        "other": [{"b64_json": value}],
    }
    out, rewriter = rewrite([json.dumps(body).encode()])
    assert json.loads(out) == {**body, "created": CREATED}
    assert rewriter.images == 3


def test_a_prefix_written_with_unicode_escapes_is_left_alone() -> None:
    # The prefix is matched on the JSON text; no encoder escapes these characters.
    body = b'{"data":[{"b64_json":"data\\u003aimage/png;base64,iVBOR"}]}'
    assert orjson_items(rewrite([body])[0]) == [{"b64_json": "data:image/png;base64,iVBOR"}]


def test_an_error_object_is_reported_before_a_byte_is_released() -> None:
    error = {"message": "generation failed", "type": "new_api_error", "code": "x"}
    body = json.dumps({"error": error}).encode()
    for items_only in (False, True):
        rewriter = ImagesBodyRewriter(created=CREATED, items_only=items_only)
        assert rewriter.feed(body) == b""
        with pytest.raises(UpstreamBodyError) as info:
            rewriter.finish()
        assert info.value.reason == "error_object"
        assert info.value.error == error


def test_items_only_keeps_the_error_object_of_a_200() -> None:
    """A fanout call's 200 carrying an error is released, so its error must be seen."""
    rewriter = ImagesBodyRewriter(created=0, items_only=True)
    rewriter.feed(b'{"error":{"message":"m","code":"generation_failed"}}')
    with pytest.raises(UpstreamBodyError) as info:
        rewriter.finish()
    assert info.value.error == {"message": "m", "code": "generation_failed"}


def test_items_only_releases_no_whitespace_of_the_array() -> None:
    """Fanout puts a comma before any bytes an answer releases: an empty array's
    whitespace would leave ``[A, ]`` for the client."""
    assert rewrite([b'{"data":[ \n ]}'], items_only=True)[0] == b""
    out, _ = rewrite([b'{"data": [\n  {"url": "a"} ,\n  {"url": "b"}\n]}'], items_only=True)
    assert out == b'{"url": "a"},{"url": "b"}'


def test_only_the_first_data_array_holds_the_images() -> None:
    """A second top-level ``data`` array made items_only drop the first one's items
    when both came in one chunk, and keep them when cut between."""
    body = b'{"data":[{"url":"a"}],"data":[{"url":"b"}]}'
    for chunks in ([body], [body[:22], body[22:]]):
        out, rewriter = rewrite(chunks, items_only=True)
        assert (out, rewriter.images) == (b'{"url":"a"}', 1)
        assert rewrite(chunks)[0] == body[:-1] + b',"created":%d}' % CREATED


def test_a_body_without_data_is_refused() -> None:
    for body, reason in (
        (b'{"created":1}', "no_data"),
        (b'{"data":{"url":"a"}}', "no_data"),
        (b'{"data":null}', "no_data"),
        (b'[{"data":[]}]', "malformed"),
        (b'{"data":[]', "malformed"),
        (b'{"data":[]}x', "malformed"),
        (b"", "malformed"),
    ):
        assert outcome([body])[1] == reason, body


def test_a_preamble_past_the_limit_is_refused() -> None:
    rewriter = ImagesBodyRewriter(created=CREATED, max_preamble=100)
    assert rewriter.feed(b'{"usage":"' + b"x" * 80) == b""
    with pytest.raises(UpstreamBodyError) as info:
        rewriter.feed(b"x" * 80)
    assert info.value.reason == "too_large_preamble"


def test_nesting_past_the_limit_is_malformed() -> None:
    """Each level of nesting costs memory: an upstream sending 20 MB of ``[`` must not
    cost gigabytes."""
    body = b'{"data":[' + b"[" * (MAX_DEPTH * 4)
    out, reason = outcome([body])
    assert reason == "malformed"
    assert out.startswith(b'{"data":[') and len(out) < MAX_DEPTH + 16
    ok = b'{"data":[' + b"[" * (MAX_DEPTH - 2) + b"]" * (MAX_DEPTH - 2) + b"]}"
    assert outcome([ok])[1] is None


def orjson_items(out: bytes) -> list[Any]:
    items: list[Any] = json.loads(out)["data"]
    return items


# Properties ------------------------------------------------------------------------


@PROPERTY
@given(st.data(), BODIES, st.booleans(), CUTS)
def test_a_valid_body_comes_out_as_the_reference_edit(
    data: st.DataObject, body: dict[str, Any], strip: bool, cuts: list[int]
) -> None:
    raw = data.draw(encoded(body)).encode()
    out, rewriter = rewrite(cut(raw, cuts), strip_prefix=strip)
    result = json.loads(out)
    expected = reference(body, CREATED, strip)
    assert result == expected
    assert list(result)[-1] == "created" or "created" in body
    assert rewriter.images == len(body["data"])
    assert rewriter.decided


@PROPERTY
@given(st.data(), BODIES, st.booleans(), CUTS)
def test_items_only_releases_the_reference_items(
    data: st.DataObject, body: dict[str, Any], strip: bool, cuts: list[int]
) -> None:
    raw = data.draw(encoded(body)).encode()
    out, rewriter = rewrite(cut(raw, cuts), strip_prefix=strip, items_only=True)
    assert json.loads(b"[" + out + b"]") == reference_items(body, strip)
    assert (out == b"") == (not body["data"])
    assert rewriter.images == len(body["data"])


@PROPERTY
@given(st.data(), BODIES, st.booleans(), CUTS, CUTS)
def test_the_output_does_not_depend_on_where_the_body_is_cut(
    data: st.DataObject, body: dict[str, Any], strip: bool, cuts: list[int], others: list[int]
) -> None:
    raw = data.draw(encoded(body)).encode()
    whole = rewrite([raw], strip_prefix=strip)[0]
    assert rewrite(cut(raw, cuts), strip_prefix=strip)[0] == whole
    assert rewrite(cut(raw, others), strip_prefix=strip)[0] == whole
    if len(raw) < 2000:
        assert rewrite([bytes((b,)) for b in raw], strip_prefix=strip)[0] == whole


ERRORS = st.fixed_dictionaries(
    {"message": st.text(), "type": st.sampled_from(["new_api_error", "upstream_error"])},
    optional={"code": st.text(max_size=20) | st.none(), "param": st.just("")},
)
REFUSALS = st.one_of(
    st.fixed_dictionaries({"error": ERRORS}, optional={"created": st.integers(0, 2**31)}),
    st.fixed_dictionaries({"error": ANY_JSON}),
    st.fixed_dictionaries({}, optional={"data": SCALARS, "created": st.integers(0, 9)}),
)


@PROPERTY
@given(st.data(), REFUSALS, st.booleans(), CUTS)
def test_a_body_without_a_data_array_is_refused_with_its_error(
    data: st.DataObject, body: dict[str, Any], items_only: bool, cuts: list[int]
) -> None:
    raw = data.draw(encoded(body)).encode()
    released, reason = outcome(cut(raw, cuts), items_only=items_only)
    assert released == b""
    if "error" in body:
        assert reason == "error_object"
    else:
        assert reason == "no_data"
    rewriter = ImagesBodyRewriter(created=CREATED, items_only=items_only)
    for chunk in cut(raw, cuts):
        rewriter.feed(chunk)
    with pytest.raises(UpstreamBodyError) as info:
        rewriter.finish()
    error = body.get("error")
    assert info.value.error == (error if isinstance(error, dict) else None)


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A valid body with some of its bytes replaced, dropped or repeated."""
    raw = bytearray(draw(encoded(draw(BODIES))).encode())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        how = draw(st.sampled_from(["insert", "delete", "truncate", "repeat"]))
        junk = draw(st.binary(min_size=1, max_size=4) | st.sampled_from(b'{}[]",:\\ '))
        if how == "insert":
            raw[at:at] = junk if isinstance(junk, bytes) else bytes((junk,))
        elif how == "delete":
            del raw[at : at + draw(st.integers(1, 8))]
        elif how == "truncate":
            del raw[at:]
        else:
            raw[at:at] = raw[at : at + draw(st.integers(1, 40))]
    return bytes(raw)


ANY_BYTES = st.binary(max_size=400) | damaged()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_BYTES, st.booleans(), st.booleans(), CUTS, st.sampled_from([16, 200, 65536]))
def test_any_bytes_in_any_chunks_are_rewritten_or_refused(
    raw: bytes, strip: bool, items_only: bool, cuts: list[int], max_preamble: int
) -> None:
    options = {"strip_prefix": strip, "items_only": items_only, "max_preamble": max_preamble}
    released, reason = outcome(cut(raw, cuts), **options)
    assert reason in (None, "malformed", "no_data", "error_object", "too_large_preamble")
    if max_preamble == 65536:
        # Only whether a preamble is found too large depends on the cuts.
        assert outcome([raw], **options) == (released, reason)
        assert outcome([bytes((b,)) for b in raw], **options) == (released, reason)
