"""Fuzz target: the multipart edits path (``proxy/edits.py`` and the form parser under it).

An input is the ``Content-Type`` parameters, a newline, then the body. It is read by
``read_form`` whole and cut at points drawn from its hash; both must end the same way
(unless python-multipart's skipping of a preamble makes that depend on the cuts):
a form, or a 4xx (``InvalidRequest``, ``BodyTooLarge``), never another exception. A
form read is rebuilt for the upstream (its length as declared, every image carried,
``tests/test_edits.py``), and when the standard library's ``email`` parser reads the
same body without a defect, the form must be what it reads. No spool file may be left
open (found through the ResourceWarning of its finaliser, at the latest an input later).
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import logging
import re
import sys
import warnings
from typing import Any

import atheris

with atheris.instrument_imports(include=["proxy", "starlette.formparsers", "python_multipart"]):
    from proxy.edits import IMAGE_FIELDS

from tests.fuzz import cuts
from tests.test_edits import (
    BOUNDARY,
    MAGIC,
    Read,
    encode,
    preamble_skipped,
    read_outcome,
    sniffed,
)

UNDER_TEST = (
    "proxy.edits",
    "starlette.formparsers:MultiPartParser",
    "python_multipart.multipart:MultipartParser",
)
PLAIN = f"boundary={BOUNDARY}".encode()
_QUOTED = r'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'  # printable ASCII but for " and \\
_DISPOSITION = re.compile(f"form-data; name={_QUOTED}(; filename={_QUOTED})?")
_DELIMITER = re.compile(b"\r\n--" + BOUNDARY.encode())
_AFTER_DELIMITER = re.compile(rb"\r\n|--(\r\n|$)")
_loop = asyncio.new_event_loop()
_unraisable: list[str] = []


def _record(unraisable: Any) -> None:
    _unraisable.append(repr(unraisable.exc_value))


def read(chunks: list[bytes], content_type: str) -> Read:
    result: Read = _loop.run_until_complete(read_outcome(chunks, content_type))
    return result


def email_reading(body: bytes, content_type: str) -> Read | None:
    """The form as the standard library reads it; None where the two parsers may
    rightly differ: a defect, a delimiter after a bare LF or CR (the email parser takes
    one; RFC 2046 and python-multipart want CRLF), a delimiter line with more after it
    (RFC 2046 lets a parser match the start of a line, as python-multipart does; the
    email parser wants the whole line), or a part whose disposition is not plainly
    written in ASCII (their quoting and decoding rules differ past that)."""
    lines = _DELIMITER.split(b"\r\n" + body)
    if any(b"--" + BOUNDARY.encode() in line for line in lines) or any(
        not _AFTER_DELIMITER.match(line) for line in lines[1:]
    ):
        return None
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    if not message.is_multipart() or message.defects:
        return None
    fields: dict[str, str] = {}
    images: list[tuple[str, bytes]] = []
    for part in message.iter_parts():
        dispositions = [v for k, v in part.raw_items() if k.lower() == "content-disposition"]
        if len(dispositions) != 1 or not _DISPOSITION.fullmatch(dispositions[0]):
            return None
        name = part.get_param("name", header="content-disposition")
        content = part.get_payload(decode=True)
        if part.defects or not isinstance(name, str) or not isinstance(content, bytes):
            return None
        # Not get_filename(): it falls back to a name parameter of Content-Type.
        if part.get_param("filename", header="content-disposition") is None:
            if name in fields:
                return None  # refused; the message is the proxy's to choose
            try:
                fields[name] = content.decode()
            except UnicodeDecodeError:
                fields[name] = content.decode("latin-1")
        elif name in IMAGE_FIELDS:
            if sniffed(content) is None:
                return None
            images.append((name, content))
        else:
            fields.setdefault(name, "")
    return Read(fields=fields, images=tuple(images))


def test_one_input(data: bytes) -> None:
    params, _, body = data.partition(b"\n")
    content_type = "multipart/form-data; " + params.decode("latin-1")
    whole = read([body], content_type)
    if not preamble_skipped(body):
        assert read(cuts(body), content_type) == whole
    if whole.error is None and params == PLAIN:
        expected = email_reading(body, content_type)
        assert expected is None or expected == whole, (expected, whole)
    if _unraisable:
        raise AssertionError(f"left open: {_unraisable}")


def seeds() -> list[bytes]:
    """Forms as the OpenAI SDK (httpx) writes them, then a few that are not."""
    png, jpeg, webp = (MAGIC[kind] + bytes(range(24)) for kind in sorted(MAGIC))
    one = [("image", ("a.png", png, "image/png"))]
    three = [
        ("image[]", ("a.png", png, "image/png")),
        ("image[]", ("b.jpg", jpeg, "image/jpeg")),
        ("image[]", ("c.webp", webp, "image/webp")),
    ]
    full = {"model": "gpt-image-2-vip", "prompt": "a lighthouse", "size": "2048x1152", "n": "1"}
    forms: list[tuple[dict[str, str], list[tuple[str, tuple[str, bytes, str]]]]] = [
        ({"prompt": "merge these"}, one),
        ({**full, "response_format": "b64_json"}, three),
        ({"prompt": "猫と犬\r\n--", "quality": "high"}, one),
        ({"prompt": "x"}, [*one, ("mask", ("m.png", png, "image/png"))]),
        ({"prompt": "no image"}, []),
        ({"prompt": "gif"}, [("image", ("a.gif", b"GIF89a" + bytes(20), "image/gif"))]),
    ]
    out = []
    for fields, files in forms:
        body, content_type = encode(fields, files)
        boundary = content_type.partition("boundary=")[2]
        out.append(PLAIN + b"\n" + body.replace(boundary.encode(), BOUNDARY.encode()))
    first = out[0].partition(b"\n")[2]
    twice = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na\r\n' * 2
    out += [
        b"charset=utf-8; " + PLAIN + b"\n" + first,
        b"charset=unicode_escape; " + PLAIN + b"\n" + first.replace(b"merge", b"\\ud800"),
        f'boundary="{BOUNDARY}"'.encode() + b"\n" + first,
        PLAIN + b"\n" + first[:-60],  # cut short
        PLAIN + b"\n" + b"preamble\r\n" + first + b"epilogue",
        PLAIN + b"\n" + (twice + f"--{BOUNDARY}--\r\n").encode(),  # a field sent twice
    ]
    return out


def prepare() -> None:
    logging.disable(logging.CRITICAL)  # python-multipart logs every malformed body
    warnings.simplefilter("always", ResourceWarning)
    sys.unraisablehook = _record
