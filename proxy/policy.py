"""The request policy (SPEC section 5): a client body in, the upstream body out.

Pure: no I/O. ``RequestPolicy.generation`` takes whatever JSON the client sent and
either returns a ``Decision`` (the exact body for the upstream, how many images to
charge and calls to make, and what was changed) or raises ``InvalidRequest``.
``field_action`` decides each field the upstream does not take; ``body_limit``
decides how many bytes a request body may have.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .config import PolicySettings
from .errors import InvalidRequest
from .http import BodyLimit, decimal
from .sizes import SizeTable, normalise_size

RESPONSE_FORMATS = ("url", "b64_json")
# What the upstream takes (SPEC section 2), and what the policy rules on itself.
TAKEN = frozenset({"model", "prompt", "size", "response_format"})
HANDLED = frozenset({"n", "stream"})
# Fields OpenAI's API takes that the upstream refuses, in SPEC section 5's two kinds.
# Without these the upstream draws the picture the caller asked for, give or take.
COSMETIC = frozenset({"quality", "style", "moderation", "user"})
# Without these it draws, and bills, another: an unmasked edit, an opaque background,
# a PNG where a JPEG was asked for, a square where a ratio was.
CHANGES_PICTURE = frozenset({
    "mask", "background", "output_format", "output_compression", "aspect_ratio",
    "partial_images",
})  # fmt: skip
# Client-chosen field names are echoed in a response header: keep them to a safe token.
_UNSAFE_LABEL = re.compile(r"[^A-Za-z0-9_.\-\[\]]")

# A JSON encoder writes one character of a string in at most 12 bytes: one outside the
# Basic Multilingual Plane as two \uXXXX escapes (json.dumps' default, ensure_ascii).
# Form charsets stay within it too (unicode_escape: 10, UTF-8: 4).
BYTES_PER_PROMPT_CHAR = 12
# Room for everything in a body but its prompt: the other fields, their names, spacing.
OTHER_FIELDS_BYTES = 16 * 1024


class FieldAction(enum.Enum):
    """What becomes of one field of a request (``field_action``)."""

    KEEP = "keep"  # the upstream takes it, or the policy rules on it itself
    DROP = "drop"  # not sent; reported in x-proxy-adjusted
    REFUSE = "refuse"  # 400: unsupported_fields is reject
    REFUSE_PICTURE = "refuse_picture"  # 400 whatever the setting


def field_action(name: str, value: object, unsupported: Literal["strip", "reject"]) -> FieldAction:
    """The rule for a field: cosmetic and unknown fields follow ``unsupported_fields``;
    a field whose loss would bill a different picture is refused whatever the setting
    (an explicit null asks for nothing, so losing it changes nothing)."""
    if name in TAKEN or name in HANDLED:
        return FieldAction.KEEP
    if name in CHANGES_PICTURE and value is not None:
        return FieldAction.REFUSE_PICTURE
    return FieldAction.DROP if unsupported == "strip" else FieldAction.REFUSE


def body_limit(configured: int, max_prompt_chars: int, setting: str) -> BodyLimit:
    """The body limit: ``configured``, raised so that a body whose prompt has the most
    characters allowed always fits, however its JSON (or form charset) escapes them.

    A prompt over the limit is then always read and refused as a 400 naming ``prompt``,
    never a 413, and a 32,000-character Chinese prompt is accepted.
    """
    floor = BYTES_PER_PROMPT_CHAR * max_prompt_chars + OTHER_FIELDS_BYTES
    if configured >= floor:
        return BodyLimit(configured, f" ({setting})")
    return BodyLimit(
        floor,
        f" ({BYTES_PER_PROMPT_CHAR} bytes for each of the {max_prompt_chars} characters a "
        f"prompt may have, as JSON escapes them at worst, plus {OTHER_FIELDS_BYTES} for the "
        f"other fields; {setting} is raised to this)",
    )


@dataclass(frozen=True)
class Decision:
    model: str
    body: dict[str, Any]
    images: int
    calls: int
    response_format: str
    adjustments: tuple[str, ...]

    @property
    def adjusted_header(self) -> str | None:
        return "; ".join(self.adjustments) or None


def _show(value: object) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 50 else text[:47] + "..."


def _label(name: str) -> str:
    """A field name as it may appear in ``x-proxy-adjusted``: printable ASCII, no separators."""
    return _UNSAFE_LABEL.sub("?", name[:50]) or "?"


def _field_refusal(name: str, action: FieldAction) -> InvalidRequest:
    if action is FieldAction.REFUSE_PICTURE:
        return InvalidRequest(
            f"The field {_show(name)} is not supported: the upstream does not take it, and "
            "dropping it would bill a different picture than the one asked for. Remove it.",
            param=name,
            code="unsupported_field",
        )
    known = name in COSMETIC or name in CHANGES_PICTURE
    kind = "not supported by the upstream" if known else "unknown"
    return InvalidRequest(
        f"The field {_show(name)} is {kind}; remove it.",
        param=name[:50],
        code="unsupported_field",
    )


class RequestPolicy:
    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings
        self.models = {m.name for m in settings.models}
        self.tables = {m.name: SizeTable.for_model(m) for m in settings.models}
        self.body_limit = body_limit(
            settings.max_body_bytes, settings.max_prompt_chars, "policy.max_body_bytes"
        )

    def resolve_model(self, name: object) -> str:
        if name is None:
            return self.settings.default_model
        if not isinstance(name, str):
            raise InvalidRequest("'model' must be a string.", param="model")
        if name in self.models:
            return name
        target = self.settings.model_aliases.get(name)
        if target is not None:
            return target
        choices = ", ".join(sorted(self.models))
        raise InvalidRequest(
            f"The model {_show(name)} does not exist here; use one of: {choices}.",
            param="model",
            code="model_not_found",
        )

    def generation(self, body: object) -> Decision:
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        return self._decide(body, from_form=False)

    def edit(self, fields: Mapping[str, str]) -> Decision:
        return self._decide(dict(fields), from_form=True)

    def _decide(self, body: dict[str, Any], *, from_form: bool) -> Decision:
        s = self.settings
        adjustments: list[str] = []
        dropped: list[str] = []
        model = self.resolve_model(body.get("model"))
        if body.get("model") != model:
            adjustments.append(f"model={model}")
        prompt = self._prompt(body.get("prompt"))
        upstream: dict[str, Any] = {"model": model, "prompt": prompt}

        if "size" in body and body["size"] is not None:
            size = self._size(body["size"], model)
            upstream["size"] = size
            if size != body["size"]:
                adjustments.append(f"size={size}")

        response_format = body.get("response_format")
        if response_format is None or (from_form and response_format == ""):
            response_format = s.default_response_format
            adjustments.append(f"response_format={response_format}")
        elif response_format not in RESPONSE_FORMATS:
            raise InvalidRequest(
                f"'response_format' must be 'url' or 'b64_json', not {_show(response_format)}.",
                param="response_format",
            )
        upstream["response_format"] = response_format

        stream = body.get("stream")
        if from_form and isinstance(stream, str):
            stream = stream.strip().lower() in ("true", "1")
        if stream is True:
            raise InvalidRequest(
                "Streaming is not supported for image generation here; omit 'stream'.",
                param="stream",
                code="stream_not_supported",
            )
        if "stream" in body:
            dropped.append("stream")

        images = calls = 1
        if "n" in body and body["n"] is None:
            dropped.append("n")  # an SDK's explicit None: the default, as OpenAI takes it
        elif "n" in body:
            n = self._n(body["n"], from_form)
            dropped.append("n")
            if n > 1:
                if s.n == "reject":
                    raise InvalidRequest(
                        f"n={n} is not supported: the upstream bills n images but returns only "
                        "one. Send n=1 (or omit it) and make separate requests.",
                        param="n",
                        code="n_not_supported",
                    )
                if s.n == "strip":
                    adjustments.append("n=1")
                else:
                    images = calls = n

        actions = {name: field_action(name, body[name], s.unsupported_fields) for name in body}
        # One field is named, whatever the client's key order: one that changes the
        # picture first, since no setting lets it through.
        refusals = sorted(
            (action is not FieldAction.REFUSE_PICTURE, name)
            for name, action in actions.items()
            if action in (FieldAction.REFUSE_PICTURE, FieldAction.REFUSE)
        )
        if refusals:
            name = refusals[0][1]
            raise _field_refusal(name, actions[name])
        dropped += [_label(name) for name, action in actions.items() if action is FieldAction.DROP]
        if dropped:
            adjustments.append("dropped=" + ",".join(sorted(dropped)))
        return Decision(model, upstream, images, calls, response_format, tuple(adjustments))

    def _prompt(self, prompt: object) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequest("'prompt' is required: a non-empty string.", param="prompt")
        if len(prompt) > self.settings.max_prompt_chars:
            raise InvalidRequest(
                f"'prompt' is longer than {self.settings.max_prompt_chars} characters.",
                param="prompt",
                code="prompt_too_long",
            )
        return prompt

    def _size(self, raw: object, model: str) -> str:
        if not isinstance(raw, str):
            raise InvalidRequest("'size' must be a string such as '2048x1152'.", param="size")
        table = self.tables[model]
        size = normalise_size(raw)
        if not table.accepts(size):
            alias = self.settings.size_aliases.get(size)
            if alias is not None and table.accepts(alias):
                return alias
            nearest = ", ".join(table.nearest(size))
            raise InvalidRequest(
                f"The size {_show(raw)} is not available for {model}; nearest valid sizes: "
                f"{nearest} (or 'auto').",
                param="size",
                code="invalid_size",
            )
        return size

    def _n(self, raw: object, from_form: bool) -> int:
        value = raw
        if from_form and isinstance(raw, str):
            value = decimal(raw)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest("'n' must be an integer from 1 to 10.", param="n")
        if not 1 <= value <= self.settings.max_n:
            raise InvalidRequest(f"'n' must be from 1 to {self.settings.max_n}.", param="n")
        return value
