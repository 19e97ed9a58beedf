"""The request bodies of the proxy's own API, as pydantic models.

The admin API validates its JSON bodies with these models (``validated``); the
OpenAPI document (``proxy.openapi``) is generated from them. The image routes'
bodies are described here too (``ImageGeneration``, ``ImageEdit``), but the request
policy (``proxy.policy``) keeps ruling on them on the hot path; a test holds the two
to the same types.

The limit fields follow ``proxy.limits``, the one owner of that rule: absent is
"unchanged" (or the configured default at creation), ``null`` is no limit, ``0``
allows nothing. Types are strict where JSON could be read two ways: ``"5"`` is not
a number and ``true`` is not a count.

A ``ValidationError`` becomes an ``InvalidRequest`` in one place, ``validated``: its
``param`` is the field's path (``models[1]``) and its message names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from .errors import InvalidRequest
from .limits import MAX_COUNT, MAX_USD, LimitError, team_name, usd_to_micros, whole_count

NAME_MAX = 200  # characters of a key's name
# Our own refusals carry their whole message; pydantic's own are worded in ``_message``.
REFUSAL = "proxy_refusal"


def refusal(message: str) -> PydanticCustomError:
    return PydanticCustomError(REFUSAL, "{message}", {"message": message})


def _usd(value: object, info: ValidationInfo) -> object:
    try:
        usd_to_micros(value)
    except LimitError as error:
        raise refusal(f"'{info.field_name}' {error.reason}, or null for no limit.") from None
    return value


def _count(value: object, info: ValidationInfo) -> object:
    try:
        return whole_count(value)  # 2.0 is 2, as JSON Schema's "integer" has it
    except LimitError as error:
        raise refusal(f"'{info.field_name}' {error.reason}, or null for no limit.") from None


def _team(value: object, info: ValidationInfo) -> object:
    try:
        return team_name(value)
    except LimitError as error:
        raise refusal(f"'{info.field_name}': {error.reason}.") from None


def _key_name(value: object) -> object:
    if not isinstance(value, str) or not value.strip() or len(value) > NAME_MAX:
        raise refusal(f"'name' must be a non-empty string of at most {NAME_MAX} characters.")
    return value.strip()


def _known_models(value: list[str] | None, info: ValidationInfo) -> list[str] | None:
    known: frozenset[str] | None = (info.context or {}).get("models")
    unknown = [m for m in value or () if known is not None and m not in known]
    if unknown:
        choices = ", ".join(sorted(known or ()))
        raise refusal(f"'models': unknown model {unknown[0]!r}; use one of: {choices}.")
    return value


def _picture_field(value: object) -> object:
    if value is None:  # asks for nothing, so losing it changes nothing
        return None
    raise refusal("This field changes the picture the upstream would draw; it is not supported.")


# A budget in USD: 0 allows nothing; a positive amount is at least one micro-dollar.
# The constraints come before the validators that enforce them (through proxy.limits),
# so that they reach the JSON schema.
USD = Annotated[
    float,
    Field(ge=0, le=MAX_USD, description="USD; 0 allows nothing, else at least 0.000001"),
    BeforeValidator(_usd),
]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT), BeforeValidator(_count)]
TeamName = Annotated[
    str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$", max_length=64), BeforeValidator(_team)
]
KeyName = Annotated[str, Field(min_length=1, max_length=NAME_MAX), BeforeValidator(_key_name)]
ModelNames = Annotated[
    list[StrictStr] | None,
    AfterValidator(_known_models),
    Field(description="Models the key may use (GET /v1/models); null or [] is every model."),
]

NO_LIMIT = "null is no limit"


def not_null(description: str) -> Any:
    """A field that may be left out but, sent, is never null: its default is only
    what "absent" looks like (``model_fields_set`` tells the two apart)."""
    return Field(None, description=description)


class Body(BaseModel):
    """A JSON body: unknown fields refused, absent fields told apart from null."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class KeyLimits(Body):
    daily_usd: USD | None = Field(None, description=f"Budget per day; {NO_LIMIT}.")
    monthly_usd: USD | None = Field(None, description=f"Budget per month; {NO_LIMIT}.")
    rpm: Count | None = Field(None, description=f"Requests per minute; {NO_LIMIT}.")
    concurrency: Count | None = Field(None, description=f"Calls in flight; {NO_LIMIT}.")


class KeyCreate(KeyLimits):
    """``POST /admin/keys``. A limit left out takes the configured default."""

    name: KeyName
    team: TeamName | None = Field(None, description="Fixed at creation: its budget applies.")
    models: ModelNames = None


class KeyChange(KeyLimits):
    """``PATCH /admin/keys/{key_id}``: only the fields sent change."""

    name: KeyName = not_null("The key's new name.")
    team: TeamName | None = Field(
        None, description="A key's team is fixed at creation; only its current team is taken."
    )
    models: ModelNames = None
    revoked: StrictBool = not_null("true revokes the key, false restores it.")


class TeamLimits(Body):
    daily_usd: USD | None = Field(None, description=f"Budget per day; {NO_LIMIT}.")
    monthly_usd: USD | None = Field(None, description=f"Budget per month; {NO_LIMIT}.")


class TeamCreate(TeamLimits):
    """``POST /admin/teams``: creates the team, or changes the budgets it sends."""

    name: TeamName


class TeamChange(TeamLimits):
    """``PATCH /admin/teams/{team}``: creates the team if absent; only the fields sent change."""

    name: TeamName = not_null("The team of the path, if sent at all.")


BodyT = TypeVar("BodyT", bound=BaseModel)


def validated(
    model: type[BodyT], body: Mapping[str, Any], context: Mapping[str, Any] | None = None
) -> BodyT:
    """``body`` as ``model``, or the ``InvalidRequest`` naming its first wrong field."""
    try:
        return model.model_validate(body, context=context)
    except ValidationError as error:
        raise invalid_request(error) from None


def invalid_request(error: ValidationError) -> InvalidRequest:
    first = error.errors(include_url=False)[0]
    param = field_path(first["loc"])
    return InvalidRequest(_message(first["type"], param, first["msg"]), param=param or None)


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("models", 1)`` as ``models[1]``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def _message(kind: str, param: str, text: str) -> str:
    if kind == REFUSAL:
        return text
    if kind == "extra_forbidden":
        return f"Unknown field {param!r}."
    if kind == "missing":
        return f"'{param}' is required."
    if kind == "model_type":
        return "The request body must be a JSON object."
    return f"'{param}': {text}."


# The image routes -------------------------------------------------------------------
# Described for the document, and held to the request policy by a test; the policy
# itself rules on the hot path (a model there would cost more than the rest of it).

ResponseFormat = Literal["url", "b64_json"]
MODEL = "A model or alias of GET /v1/models; absent is the default model."
SIZE = (
    "WIDTHxHEIGHT among the model's sizes ('2048 × 1152' is normalised; OpenAI sizes map "
    "to the nearest tier), or 'auto'."
)
Prompt = Annotated[
    StrictStr,
    AfterValidator(lambda p: _not_blank(p)),
    Field(min_length=1, max_length=32_000, description="Not blank."),
]
PictureField = Annotated[
    None,
    BeforeValidator(_picture_field),
    WithJsonSchema({"type": "null", "description": "Refused unless null (SPEC section 5)."}),
]


def _not_blank(prompt: str) -> str:
    if not prompt.strip():
        raise refusal("'prompt' is required: a non-empty string.")
    return prompt


def _not_true(value: object) -> object:
    if value is True:
        raise refusal("Streaming is not supported for image generation here; omit 'stream'.")
    return value


class ImageGeneration(BaseModel):
    """``POST /v1/images/generations``. Cosmetic fields the upstream does not take
    (``quality``, ``style``, ``moderation``, ``user``, unknown ones) are dropped, or
    refused with ``policy.unsupported_fields: reject``; those whose loss would change
    the picture are refused unless null."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model: StrictStr | None = Field(None, description=MODEL)
    prompt: Prompt
    size: StrictStr | None = Field(None, description=SIZE)
    response_format: ResponseFormat | None = Field(
        None, description="Absent is policy.default_response_format; always sent upstream."
    )
    n: Annotated[StrictInt, Field(ge=1, le=10)] | None = Field(
        None, description="Above 1 follows policy.n: reject (400), strip or fanout."
    )
    stream: Annotated[
        Any,
        AfterValidator(_not_true),
        WithJsonSchema({"not": {"const": True}, "description": "true is refused."}),
    ] = None
    quality: Any = None
    style: Any = None
    moderation: Any = None
    user: Any = None
    mask: PictureField = None
    background: PictureField = None
    output_format: PictureField = None
    output_compression: PictureField = None
    aspect_ratio: PictureField = None
    partial_images: PictureField = None


ImageFile = Annotated[
    bytes,
    WithJsonSchema({"type": "string", "contentMediaType": "application/octet-stream"}),
]


class ImageEdit(BaseModel):
    """``POST /v1/images/edits``, a multipart form: 1 to 16 PNG, JPEG or WebP images as
    repeated ``image`` (or ``image[]``) parts, in order, and the generation's text fields."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model: StrictStr = not_null(MODEL)
    prompt: Prompt
    size: StrictStr = not_null(SIZE)
    response_format: Literal["url", "b64_json", ""] = not_null(
        "Empty or absent is policy.default_response_format."
    )
    n: Annotated[StrictStr, Field(pattern=r"^\s*[0-9]{1,18}\s*$")] = not_null(
        "1 to 10, as for a generation."
    )
    image: Annotated[list[ImageFile], Field(min_length=1, max_length=16)]
