"""Multipart bodies of ``/v1/images/edits``: read within the limit, rebuilt for upstream.

The client's form is parsed with parts spooled to disk past 1 MB, checked (1 to 16
images, png/jpeg/webp by their bytes, order kept), and the upstream body is rebuilt
from the policy's text fields plus the image parts, streamed with a known length.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.types import Message, Receive, Scope

from .config import PolicySettings
from .errors import InvalidRequest
from .http import ClientGone, decimal
from .policy import BYTES_PER_PROMPT_CHAR, body_limit

IMAGE_FIELDS = ("image", "image[]")
CHUNK = 64 * 1024
LIMIT_SETTING = "policy.max_edit_body_bytes"
MB = 1024 * 1024
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


@dataclass
class EditForm:
    fields: dict[str, str]
    images: list[tuple[str, UploadFile]]

    async def close(self) -> None:
        for _, upload in self.images:
            await upload.close()

    def check_images(self, most: int) -> None:
        if not self.images:
            raise InvalidRequest("At least one 'image' part is required.", param="image")
        if len(self.images) > most:
            raise InvalidRequest(f"At most {most} images may be sent.", param="image")

    def upstream_body(
        self, fields: Mapping[str, object]
    ) -> tuple[AsyncIterator[bytes], dict[str, str]]:
        boundary = "apiyi-" + secrets.token_hex(16)
        heads: list[bytes] = []
        for name, value in fields.items():
            heads.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                f"{value}\r\n".encode()
            )
        parts: list[tuple[bytes, UploadFile]] = []
        for i, (name, upload) in enumerate(self.images):
            mime = sniff(upload) or "application/octet-stream"
            filename = f"image{i}.{mime.rpartition('/')[2]}"
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\nContent-Type: {mime}\r\n\r\n'
            ).encode()
            parts.append((head, upload))
        tail = f"--{boundary}--\r\n".encode()
        length = sum(map(len, heads)) + len(tail)
        length += sum(len(head) + (upload.size or 0) + 2 for head, upload in parts)

        async def stream() -> AsyncIterator[bytes]:
            for head in heads:
                yield head
            for head, upload in parts:
                yield head
                # Positional reads: fanout streams the same parts to several calls at once.
                fd, offset = upload.file.fileno(), 0
                while chunk := os.pread(fd, CHUNK, offset):
                    offset += len(chunk)
                    yield chunk
                yield b"\r\n"
            yield tail

        headers = {
            "content-type": f"multipart/form-data; boundary={boundary}",
            "content-length": str(length),
        }
        return stream(), headers


def text_part_limit(max_prompt_chars: int) -> int:
    """The most bytes a text part may have: a megabyte, or more if a prompt of the most
    characters allowed needs it in the form's charset."""
    return max(MB, BYTES_PER_PROMPT_CHAR * max_prompt_chars)


def sniff(upload: UploadFile) -> str | None:
    head = upload.file.read(16)
    upload.file.seek(0)
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


class _FormParser(MultiPartParser):
    """Starlette's parser, refusing a body that stops before its closing boundary.

    python-multipart takes such a body as complete and drops its unfinished last part:
    three images sent, the third cut, would reach the upstream (and be billed) as two.
    """

    def __init__(
        self, headers: Headers, stream: AsyncGenerator[bytes, None], **limits: int
    ) -> None:
        self._ended = False
        super().__init__(headers, self._to_the_end(stream), **limits)

    def on_end(self) -> None:
        self._ended = True

    async def _to_the_end(self, stream: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        async for chunk in stream:
            yield chunk
        if not self._ended:
            # Raised within the parse, so that the parser closes the files it opened.
            raise MultiPartException("it ended before its closing boundary")


def _check_text(text: str) -> None:
    """A name or value must be text a UTF-8 body can carry: the parser decodes by the
    form's ``charset``, and ``unicode_escape`` or ``utf-7`` make lone surrogates."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidRequest("The form's text is not valid Unicode; send it as UTF-8.") from None


async def read_form(
    scope: Scope, receive: Receive, headers: Mapping[str, str], policy: PolicySettings
) -> EditForm:
    limit = body_limit(policy.max_edit_body_bytes, policy.max_prompt_chars, LIMIT_SETTING)
    declared = decimal(headers.get("content-length", ""))
    if declared is not None and declared > limit.bytes:
        raise limit.refusal()
    content_type = headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "multipart/form-data":
        raise InvalidRequest("Image edits take a multipart/form-data body.")
    received = 0

    async def bounded() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        received += len(message.get("body", b""))
        if received > limit.bytes:
            raise limit.refusal()
        return message

    try:
        async with contextlib.aclosing(Request(scope, bounded).stream()) as body:
            parser = _FormParser(
                Headers({"content-type": content_type}),
                body,
                max_files=policy.max_edit_images + 2,
                max_fields=32,
                max_part_size=text_part_limit(policy.max_prompt_chars),
            )
            form = await parser.parse()
    except (MultiPartException, ValueError) as exc:
        detail = getattr(exc, "message", None) or str(exc)
        raise InvalidRequest(f"The multipart body could not be read: {detail}") from None
    fields: dict[str, str] = {}
    images: list[tuple[str, UploadFile]] = []
    try:
        for name, value in form.multi_items():
            _check_text(name)
            if isinstance(value, str):
                _check_text(value)
                if name in IMAGE_FIELDS:
                    # Dropped, it would bill an edit of other images than those sent.
                    raise InvalidRequest(
                        f"{name!r} must be an image file part, not a text field.", param=name
                    )
                if name in fields:
                    raise InvalidRequest(f"The field {name!r} was sent twice.", param=name)
                fields[name] = value
            elif name in IMAGE_FIELDS:
                if sniff(value) is None:
                    raise InvalidRequest(
                        "Each image must be a PNG, JPEG or WebP file.", param="image"
                    )
                images.append((name, value))
            else:
                # Other file parts meet the field policy as present, non-null fields:
                # a mask is refused, an unknown file dropped or refused as unknown.
                fields.setdefault(name, "")
                await value.close()
    except InvalidRequest:
        await form.close()
        raise
    edit_form = EditForm(fields, images)
    scope.setdefault("state", {})["edit_form"] = edit_form
    return edit_form
