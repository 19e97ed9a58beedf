"""What the proxy's own routes answer, as pydantic models for the OpenAPI document.

The routes build their answers from the store's records (``KeyRecord.public()``,
``Team.public()``, ``RequestRecord.public()``, ``Tally.as_usd()``); these models
describe them, and the schemathesis test holds the two together against a running
proxy. Amounts are USD as JSON numbers; ``null`` for a limit is no limit.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

USD_OR_NONE = "USD; null is no limit, 0 allows nothing."


class Answer(BaseModel):
    """A JSON answer; fields may be added later, so extra ones are allowed."""

    model_config = ConfigDict(extra="allow")


class ErrorDetail(Answer):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(Answer):
    """Every error the proxy answers, OpenAI's shape."""

    error: ErrorDetail


class Key(Answer):
    """A client key as the admin API shows it: never its secret."""

    id: str
    object: Literal["proxy.key"]
    name: str
    team: str | None
    display: str = Field(description="sk-… and the key's last four characters.")
    created: int = Field(description="Unix seconds.")
    revoked: bool
    models: list[str] = Field(description="Models the key may use; [] is every model.")
    daily_usd: float | None = Field(description=USD_OR_NONE)
    monthly_usd: float | None = Field(description=USD_OR_NONE)
    rpm: int | None
    concurrency: int | None


class CreatedKey(Key):
    key: str = Field(description="The secret: shown this once, never again.")


class KeyList(Answer):
    object: Literal["list"]
    data: list[Key]


class RevokedKey(Answer):
    id: str
    object: Literal["proxy.key"]
    revoked: Literal[True]


class Team(Answer):
    name: str
    object: Literal["proxy.team"]
    daily_usd: float | None = Field(description=USD_OR_NONE)
    monthly_usd: float | None = Field(description=USD_OR_NONE)


class TeamList(Answer):
    object: Literal["list"]
    data: list[Team]


class Tally(Answer):
    """Spend of one key or team in one period."""

    limit_usd: float | None = Field(description=USD_OR_NONE)
    held_usd: float = Field(description="Reserved by calls in flight.")
    spent_usd: float = Field(description="Spent, the uncertain part included.")
    uncertain_usd: float = Field(description="Kept as spent: the upstream may have billed.")
    remaining_usd: float | None = Field(description="null: no limit.")
    requests: int


class Tallies(Answer):
    today: Tally
    this_month: Tally


class KeyUsage(Key):
    today: Tally
    this_month: Tally


class TeamUsage(Tallies):
    team: str


class OwnTeamUsage(Tallies):
    name: str


class UsageRow(Answer):
    """One name's spend in one period; the name column is that of ``by``."""

    period: str = Field(description="YYYY-MM-DD or YYYY-MM.")
    key_id: str | None = Field(None, description="by=key (with the key's name).")
    name: str | None = Field(None, description="by=key: the key's name.")
    team: str | None = Field(None, description="by=team.")
    model: str | None = Field(None, description="by=model.")
    spent_usd: float
    uncertain_usd: float
    requests: int


class History(Answer):
    object: Literal["proxy.usage_history"]
    from_: str = Field(alias="from", description="The first day, YYYY-MM-DD.")
    to: str = Field(description="The last day, YYYY-MM-DD.")
    by: Literal["key", "team", "model"]
    period: Literal["day", "month"]
    rows: list[UsageRow]


class UsageReport(History):
    """``GET /admin/usage``; without history parameters, also today's and this month's
    totals per key and team."""

    day: str | None = None
    month: str | None = None
    keys: list[KeyUsage] | None = None
    teams: list[TeamUsage] | None = None


class OwnUsage(Tallies):
    """``GET /v1/usage`` without history parameters."""

    object: Literal["proxy.usage"]
    key: Key
    day: str
    month: str
    team: OwnTeamUsage | None = Field(None, description="The key's team, if it has one.")


class OwnHistory(History):
    """``GET /v1/usage`` with ``from``, ``to``, ``period`` or ``format``."""

    key: Key


OwnUsageAnswer = Annotated[OwnUsage | OwnHistory, Field(discriminator="object")]


class RequestEntry(Answer):
    time: str = Field(description="ISO 8601, UTC, milliseconds.")
    request_id: str
    key_id: str
    team: str | None
    model: str
    size: str | None
    images: int
    cost_usd: float
    outcome: str = Field(description="settled, released or uncertain.")


class RequestPage(Answer):
    data: list[RequestEntry]
    next_cursor: str | None = Field(description="The cursor of the next page; null: the last.")


class Model(Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    alias_of: str | None = Field(None, description="An alias: the model it maps to.")


class ModelList(Answer):
    object: Literal["list"]
    data: list[Model]


class Image(Answer):
    url: str | None = None
    b64_json: str | None = Field(None, description="Plain base64 (b64_prefix: strip).")


class Images(Answer):
    created: int
    data: list[Image]


class Status(Answer):
    status: Literal["ok", "ready"]
