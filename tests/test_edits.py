"""Multipart edit bodies, in-process: read within the limit, rebuilt for the upstream.

The reference for a valid form: httpx's multipart encoder (the OpenAI SDK's) writes
it, ``read_form`` reads it in any chunks, and the standard library's ``email`` parser
reads the rebuilt upstream body back. Its text fields must be the policy's decision on
the form's fields, and its files the client's images, in order, under their names,
with the type their bytes show.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import itertools
import random
import tracemalloc
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.types import Message, Scope

from proxy.config import PolicySettings
from proxy.edits import IMAGE_FIELDS, EditForm, read_form
from proxy.errors import BodyTooLarge, InvalidRequest
from proxy.http import ClientGone, header_map
from proxy.policy import RequestPolicy

POLICY = PolicySettings()
MAGIC = {
    "image/png": b"\x89PNG\r\n\x1a\n",
    "image/jpeg": b"\xff\xd8\xff\xe0",
    "image/webp": b"RIFF\x10\x00\x00\x00WEBPVP8 ",
}
BOUNDARY = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MB = 1024 * 1024


def cut(raw: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    return [raw[a:b] for a, b in itertools.pairwise(points)]


def encode(
    fields: Mapping[str, str], files: list[tuple[str, tuple[str, bytes, str]]]
) -> tuple[bytes, str]:
    """The body and content type httpx (the OpenAI SDK's client) sends for this form."""
    request = httpx.Request(
        "POST", "http://proxy.test/v1/images/edits", data=dict(fields), files=files
    )
    return request.read(), request.headers["content-type"]


def scope_for(content_type: str, length: int | None) -> Scope:
    headers = [(b"content-type", content_type.encode())]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": "POST", "path": "/v1/images/edits", "headers": headers}


async def read(
    chunks: list[bytes],
    content_type: str,
    policy: PolicySettings = POLICY,
    *,
    declared: int | None = None,
    then_gone: bool = False,
) -> EditForm:
    messages: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": True} for chunk in chunks
    ]
    if not then_gone:
        messages.append({"type": "http.request", "body": b"", "more_body": False})
    pending = iter(messages)

    async def receive() -> Message:
        return next(pending, {"type": "http.disconnect"})

    scope = scope_for(content_type, declared)
    return await read_form(scope, receive, header_map(scope), policy)


@dataclass(frozen=True)
class Read:
    """What became of a body: the form read, or the error the client gets (its message
    not compared: python-multipart may notice a fault earlier when the body comes cut)."""

    fields: dict[str, str] | None = None
    images: tuple[tuple[str, bytes], ...] = ()
    error: type[Exception] | None = None
    message: str = field(default="", compare=False)


async def read_outcome(chunks: list[bytes], content_type: str, **options: Any) -> Read:
    try:
        form = await read(chunks, content_type, **options)
    except (InvalidRequest, BodyTooLarge) as exc:
        assert 400 <= exc.status < 500 and exc.message
        return Read(error=type(exc), message=exc.message)
    try:
        images = tuple([(name, await upload.read()) for name, upload in form.images])
        for _, upload in form.images:
            await upload.seek(0)
        await check_upstream_body(form)
        return Read(fields=form.fields, images=images)
    finally:
        await form.close()


async def upstream(form: EditForm, fields: Mapping[str, object]) -> tuple[bytes, str]:
    stream, headers = form.upstream_body(fields)
    body = b"".join([chunk async for chunk in stream])
    assert len(body) == int(headers["content-length"])
    return body, headers["content-type"]


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str
    content: bytes


def parse(body: bytes, content_type: str) -> list[Part]:
    """The parts of a multipart body, read by the standard library."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    assert message.is_multipart() and not message.defects
    parts = []
    for part in message.iter_parts():
        content = part.get_payload(decode=True)
        assert isinstance(content, bytes)
        name = part.get_param("name", header="content-disposition")
        parts.append(Part(str(name), part.get_filename(), part.get_content_type(), content))
    return parts


async def check_upstream_body(form: EditForm) -> None:
    """Any form read, rebuilt with its text as the prompt, is a multipart body of its
    length that carries that text and every image."""
    prompt = "\n".join(form.fields.values())
    body, content_type = await upstream(form, {"model": "gpt-image-2-vip", "prompt": prompt})
    parts = parse(body, content_type)
    assert parts[1].content == prompt.encode()
    assert [p.name for p in parts[2:]] == [name for name, _ in form.images]


def sniffed(content: bytes) -> str | None:
    """The type an image's bytes show (the formats' own signatures)."""
    if content.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if content.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp"
    return None


def preamble_skipped(body: bytes) -> bool:
    """Whether python-multipart's reading depends on the cuts: from a leading CR or LF
    it skips to the first ``-`` of the chunk at hand (any bytes between are taken as
    preamble), and without one in that chunk, to the next chunk only."""
    return body[:1] in (b"\r", b"\n") and body.lstrip(b"\r\n")[:1] != b"-"


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# Strategies ------------------------------------------------------------------------

IMAGES = st.builds(
    lambda kind, seed, size: MAGIC[kind] + random.Random(seed).randbytes(size),
    st.sampled_from(sorted(MAGIC)),
    st.integers(0, 2**16),
    st.sampled_from([0, 1, 13, 200, 5000, 70_000]),
)
FILENAMES = st.sampled_from(["a.png", "photo 1.jpg", "猫.webp", "x", 'q"uote.png', "../../etc"])
IMAGE_PARTS = st.lists(
    st.tuples(st.sampled_from(IMAGE_FIELDS), FILENAMES, IMAGES), min_size=1, max_size=4
)
TEXT = st.text(max_size=30) | st.sampled_from(["a\r\nb", "\r\n--", "猫と犬", "line\n", " "])
FORMS = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=40) | TEXT},
    optional={
        "model": st.sampled_from(["gpt-image-2-vip", "gpt-image-2-all", "gpt-image-1"]),
        "size": st.sampled_from(["1280x1280", "2048 × 1152", "1024x1024", "auto", ""]),
        "n": st.sampled_from(["1", " 1 ", "2"]),
        "response_format": st.sampled_from(["url", "b64_json", ""]),
        "quality": st.sampled_from(["high", "low"]),
        "user": TEXT,
    },
)
OTHER_FILES = st.lists(st.sampled_from(["mask", "reference"]), unique=True, max_size=1)
CUTS = st.lists(st.integers(0, 2**20), max_size=10)


# Examples --------------------------------------------------------------------------


def test_images_keep_their_order_names_and_types() -> None:
    png, jpeg, webp = (
        MAGIC[k] + bytes(range(40)) for k in ("image/png", "image/jpeg", "image/webp")
    )
    files = [
        ("image", ("a.bin", png, "application/octet-stream")),
        ("image[]", ("b.png", jpeg, "image/png")),  # the bytes say what it is
        ("image", ("c", webp, "image/webp")),
    ]
    body, content_type = encode({"prompt": "merge", "size": "1280x1280"}, files)

    async def check() -> None:
        form = await read([body], content_type)
        try:
            assert form.fields == {"prompt": "merge", "size": "1280x1280"}
            decision = RequestPolicy(POLICY).edit(form.fields)
            parts = parse(*(await upstream(form, decision.body)))
        finally:
            await form.close()
        assert [(p.name, p.content.decode()) for p in parts[:4]] == [
            ("model", "gpt-image-2-vip"),
            ("prompt", "merge"),
            ("size", "1280x1280"),
            ("response_format", "b64_json"),
        ]
        assert [(p.name, p.filename, p.content_type, p.content) for p in parts[4:]] == [
            ("image", "image0.png", "image/png", png),
            ("image[]", "image1.jpeg", "image/jpeg", jpeg),
            ("image", "image2.webp", "image/webp", webp),
        ]

    run(check())


def test_a_part_that_is_no_image_is_a_400() -> None:
    body, content_type = encode({"prompt": "x"}, [("image", ("a.png", b"GIF89a....", "image/png"))])
    outcome = run(read_outcome([body], content_type))
    assert outcome.error is InvalidRequest
    assert outcome.message == "Each image must be a PNG, JPEG or WebP file."


def test_a_field_sent_twice_is_a_400() -> None:
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nb\r\n'
        f"--{BOUNDARY}--\r\n"
    ).encode()
    outcome = run(read_outcome([body], f"multipart/form-data; boundary={BOUNDARY}"))
    assert outcome.error is InvalidRequest


def test_other_file_parts_are_fields_for_the_policy() -> None:
    png = MAGIC["image/png"] + b"x"
    files = [("image", ("a.png", png, "image/png")), ("mask", ("m.png", png, "image/png"))]
    body, content_type = encode({"prompt": "x"}, files)
    outcome = run(read_outcome([body], content_type))
    assert outcome.fields == {"prompt": "x", "mask": ""}
    assert outcome.images == (("image", png),)


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "text/plain; boundary=x",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        'multipart/form-data; boundary="unclosed',
    ],
)
def test_a_body_that_is_no_form_is_a_400(content_type: str) -> None:
    body, _ = encode({"prompt": "x"}, [("image", ("a.png", MAGIC["image/png"], "image/png"))])
    outcome = run(read_outcome([body], content_type))
    assert outcome.error is InvalidRequest, outcome


def test_a_body_cut_before_its_closing_boundary_is_a_400() -> None:
    """python-multipart takes a body that stops short as complete and drops its
    unfinished last part: two images sent must never reach the upstream as one."""
    png = MAGIC["image/png"] + bytes(range(200))
    files = [("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))]
    body, content_type = encode({"prompt": "x"}, files)
    closing = body.rindex(b"\r\n--")
    for end in (closing - 100, closing, closing + 10, len(body) - 3):
        outcome = run(read_outcome([body[:end]], content_type))
        assert outcome.error is InvalidRequest, end
    # The closing boundary ends it; what follows (an epilogue) is ignored.
    for whole in (body[:-2], body, body + b"epilogue\r\n"):
        assert run(read_outcome([whole], content_type)).images == (("image", png),) * 2


def test_a_text_field_past_a_megabyte_is_a_400() -> None:
    body, content_type = encode({"prompt": "x" * (MB + 1)}, [])
    outcome = run(read_outcome([body], content_type))
    assert outcome.error is InvalidRequest


def test_a_client_that_leaves_midway_is_client_gone() -> None:
    body, content_type = encode({"prompt": "x"}, [("image", ("a", MAGIC["image/png"], "x/y"))])
    with pytest.raises(ClientGone):
        run(read([body[:50]], content_type, then_gone=True))


def test_a_declared_length_past_the_limit_is_refused_before_reading() -> None:
    # A one-character prompt limit lets the body limit go as low as 12 + 16384 bytes.
    policy = replace(POLICY, max_edit_body_bytes=20_000, max_prompt_chars=1)

    async def receive() -> Message:
        raise AssertionError("the body was read")

    scope = scope_for(f"multipart/form-data; boundary={BOUNDARY}", 20_001)
    with pytest.raises(BodyTooLarge) as info:
        run(read_form(scope, receive, header_map(scope), policy))
    assert "limit of 20000 bytes (policy.max_edit_body_bytes)" in info.value.message


def test_the_edit_body_limit_is_raised_to_fit_the_longest_prompt() -> None:
    """A configured limit below what a prompt of the most characters needs is raised,
    so that prompt is read and judged by its characters (a 400), never a 413."""
    policy = replace(POLICY, max_edit_body_bytes=1024)
    png = MAGIC["image/png"] + b"x"
    for prompt in ("猫" * 32_000, "\U0001f431" * 32_000, "\U0001f431" * 32_001):
        body, content_type = encode({"prompt": prompt}, [("image", ("a.png", png, "image/png"))])
        assert len(body) > 90_000  # far past the configured 1024
        outcome = run(read_outcome([body], content_type, policy=policy))
        assert outcome.fields == {"prompt": prompt}
    body, content_type = encode({"prompt": "x" * 401_000}, [("image", ("a.png", png, "image/png"))])
    outcome = run(read_outcome([body], content_type, policy=policy))
    assert outcome.error is BodyTooLarge
    assert "limit of 400384 bytes" in outcome.message
    assert "each of the 32000 characters" in outcome.message
    assert "policy.max_edit_body_bytes is raised" in outcome.message


def test_the_text_part_limit_fits_the_longest_prompt_in_any_charset() -> None:
    """A prompt of the most characters allowed fits its part however the form's charset
    writes it: 120,000 characters as unicode_escape are 1.2 MB, past the usual 1 MB."""
    policy = replace(POLICY, max_prompt_chars=120_000)
    prompt = "\U0001f431" * 120_000
    png = MAGIC["image/png"]
    body, _ = encode({"prompt": "PROMPT"}, [("image", ("a.png", png, "image/png"))])
    body = body.replace(b"PROMPT", prompt.encode("unicode_escape"))
    boundary = body[2 : body.index(b"\r\n")].decode()
    content_type = f"multipart/form-data; charset=unicode_escape; boundary={boundary}"
    outcome = run(read_outcome([body], content_type, policy=policy))
    assert outcome.fields == {"prompt": prompt}
    assert RequestPolicy(policy).edit(outcome.fields).body["prompt"] == prompt
    # With the usual prompt limit, the usual part limit stays.
    outcome = run(read_outcome([body], content_type))
    assert outcome.error is InvalidRequest


@pytest.mark.parametrize("name", IMAGE_FIELDS)
def test_an_image_sent_as_a_text_field_is_a_400(name: str) -> None:
    """Dropped as an unknown field, it would bill an edit of other images than those sent."""
    png = MAGIC["image/png"]
    body, content_type = encode(
        {"prompt": "x", name: "https://example.com/a.png"},
        [("image", ("a.png", png, "image/png"))],
    )
    outcome = run(read_outcome([body], content_type))
    assert outcome.error is InvalidRequest
    assert outcome.message == f"{name!r} must be an image file part, not a text field."


@pytest.mark.parametrize("setting", ["strip", "reject"])
def test_a_mask_file_part_is_refused_by_the_policy(setting: Literal["strip", "reject"]) -> None:
    """Stripped, the mask would bill an edit of the whole image; no setting allows it."""
    png = MAGIC["image/png"] + b"x"
    files = [("image", ("a.png", png, "image/png")), ("mask", ("m.png", png, "image/png"))]
    body, content_type = encode({"prompt": "x"}, files)

    async def check() -> None:
        form = await read([body], content_type)
        try:
            with pytest.raises(InvalidRequest) as info:
                RequestPolicy(replace(POLICY, unsupported_fields=setting)).edit(form.fields)
        finally:
            await form.close()
        assert (info.value.param, info.value.code) == ("mask", "unsupported_field")
        assert "different picture" in info.value.message

    run(check())


def test_a_large_image_is_spooled_to_disk_not_held() -> None:
    image = MAGIC["image/png"] + random.Random(7).randbytes(6 * MB)
    body, content_type = encode({"prompt": "x"}, [("image", ("a.png", image, "image/png"))])
    chunks = cut(body, range(0, len(body), 64 * 1024))

    async def check() -> None:
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            form = await read(chunks, content_type)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        try:
            # The spool keeps 1 MB in memory before it moves to disk.
            assert peak < 3 * MB, peak
            parts = parse(*(await upstream(form, {"prompt": "x"})))
        finally:
            await form.close()
        assert parts[-1].content == image

    run(check())


def test_a_charset_that_decodes_to_surrogates_is_a_400() -> None:
    """A field must be text the upstream body can carry: ``charset=unicode_escape``
    turns ``\\ud800`` into a lone surrogate, which no UTF-8 body can hold."""
    png = MAGIC["image/png"]
    for charset in ("unicode_escape", "utf-7"):
        prompt = "\\ud800" if charset == "unicode_escape" else "+2AA-"
        body, _ = encode({"prompt": prompt}, [("image", ("a.png", png, "image/png"))])
        boundary = body[2 : body.index(b"\r\n")].decode()
        content_type = f"multipart/form-data; charset={charset}; boundary={boundary}"
        outcome = run(read_outcome([body], content_type))
        assert outcome.error is InvalidRequest, outcome


# Properties ------------------------------------------------------------------------


@PROPERTY
@given(FORMS, IMAGE_PARTS, OTHER_FILES, CUTS)
def test_a_valid_form_reaches_the_upstream_as_the_reference_edit(
    form: dict[str, str],
    images: list[tuple[str, str, bytes]],
    others: list[str],
    cuts: list[int],
) -> None:
    files = [(name, (filename, content, "image/png")) for name, filename, content in images]
    files += [(name, ("m.png", MAGIC["image/png"], "image/png")) for name in others]
    body, content_type = encode(form, files)
    expected_fields = {**form, **dict.fromkeys(others, "")}

    async def check() -> None:
        read_form = await read(cut(body, cuts), content_type)
        try:
            assert read_form.fields == expected_fields
            assert [name for name, _ in read_form.images] == [name for name, _, _ in images]
            try:
                decision = RequestPolicy(POLICY).edit(read_form.fields)
            except InvalidRequest:
                return  # the policy's own properties are in test_policy
            parts = parse(*(await upstream(read_form, decision.body)))
        finally:
            await read_form.close()
        texts, files_sent = parts[: len(decision.body)], parts[len(decision.body) :]
        assert [(p.name, p.filename, p.content.decode()) for p in texts] == [
            (name, None, value) for name, value in decision.body.items()
        ]
        assert [(p.name, p.content_type, p.content) for p in files_sent] == [
            (name, sniffed(content), content) for name, _, content in images
        ]
        assert [p.filename for p in files_sent] == [
            f"image{i}.{str(sniffed(content)).split('/')[1]}"
            for i, (_, _, content) in enumerate(images)
        ]

    run(check())


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A valid form with some of its bytes replaced, dropped or repeated."""
    files = [(name, (fn, content, "image/png")) for name, fn, content in draw(IMAGE_PARTS)]
    body, content_type = encode(draw(FORMS), files)
    boundary = content_type.partition("boundary=")[2].encode()
    raw = bytearray(body.replace(boundary, BOUNDARY.encode()))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        how = draw(st.sampled_from(["insert", "delete", "truncate", "repeat"]))
        if how == "insert":
            raw[at:at] = draw(
                st.binary(min_size=1, max_size=4)
                | st.sampled_from(
                    [b"\r\n", b"--", b'"', b";", b"\r\n\r\n", b"--" + BOUNDARY.encode()]
                )
            )
        elif how == "delete":
            del raw[at : at + draw(st.integers(1, 8))]
        elif how == "truncate":
            del raw[at:]
        else:
            raw[at:at] = raw[at : at + draw(st.integers(1, 60))]
    return bytes(raw)


CONTENT_TYPES = st.one_of(
    st.just(f"multipart/form-data; boundary={BOUNDARY}"),
    st.sampled_from(["utf-8", "latin-1", "utf-16", "unicode_escape", "utf-7", "idna", "rot13"]).map(
        lambda charset: f"multipart/form-data; charset={charset}; boundary={BOUNDARY}"
    ),
    st.text(max_size=30).map(lambda params: f"multipart/form-data; {params}"),
)


# charset=unicode_escape warns of a bad escape (and fails, and falls back to latin-1).
@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | damaged(), CONTENT_TYPES, CUTS)
def test_any_body_in_any_chunks_is_read_or_refused_with_a_4xx(
    raw: bytes, content_type: str, cuts: list[int]
) -> None:
    outcome = run(read_outcome(cut(raw, cuts), content_type))
    if not preamble_skipped(raw):
        assert outcome == run(read_outcome([raw], content_type))
    for _, content in outcome.images:
        assert sniffed(content)


@settings(max_examples=50, deadline=None)
@given(damaged(), CUTS, st.integers(16_396, 24_000))
def test_a_body_past_the_limit_is_a_413_wherever_it_is_cut(
    raw: bytes, cuts: list[int], limit: int
) -> None:
    # With a one-character prompt limit, the configured limit is taken from 16396 up.
    policy = replace(POLICY, max_edit_body_bytes=limit, max_prompt_chars=1)
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    outcome = run(read_outcome(cut(raw, cuts), content_type, policy=policy))
    if len(raw) > limit:
        # Cut small, the parser may refuse malformed bytes before the limit is reached.
        assert outcome.error is not None
        assert run(read_outcome([raw], content_type, policy=policy)).error is BodyTooLarge
    else:
        assert outcome.error in (None, InvalidRequest)
