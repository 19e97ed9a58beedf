"""The request policy (SPEC section 5): a client body in, the upstream body out.

Pure: no I/O. ``RequestPolicy.generation`` takes whatever JSON the client sent and
either returns a ``Decision`` (the exact body for the upstream, how many images to
charge and calls to make, and what was changed) or raises ``InvalidRequest``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import PolicySettings
from .errors import InvalidRequest
from .http import decimal
from .sizes import SizeTable, normalise_size

RESPONSE_FORMATS = ("url", "b64_json")
# Fields OpenAI's API takes that the upstream refuses; unknown fields are treated alike.
KNOWN_UNSUPPORTED = frozenset({
    "quality", "aspect_ratio", "style", "background", "moderation", "output_format",
    "output_compression", "partial_images", "user",
})  # fmt: skip
HANDLED = frozenset({"model", "prompt", "size", "n", "response_format", "stream"})
# Client-chosen field names are echoed in a response header: keep them to a safe token.
_UNSAFE_LABEL = re.compile(r"[^A-Za-z0-9_.\-\[\]]")


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


class RequestPolicy:
    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings
        self.models = {m.name for m in settings.models}
        self.tables = {m.name: SizeTable.for_model(m) for m in settings.models}

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

        for name in sorted(set(body) - HANDLED):
            if s.unsupported_fields == "reject":
                kind = "not supported by the upstream" if name in KNOWN_UNSUPPORTED else "unknown"
                raise InvalidRequest(
                    f"The field {_show(name)} is {kind}; remove it.",
                    param=str(name)[:50],
                    code="unsupported_field",
                )
            dropped.append(_label(str(name)))
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
