"""``/admin/...`` (admin token only) and ``GET /v1/usage`` (the calling key).

Keys are created with their secret shown once; listing shows ``sk-…abcd`` only.
``GET /admin/requests`` reads the per-request log a page at a time, or, as CSV, the
whole filtered log, streamed page by page.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from . import usage
from .auth import Authenticator, bears
from .config import Settings
from .errors import InvalidRequest, NotFound, ProxyError, Unauthorized
from .exchange import exchange_of
from .http import parse_json_object
from .keys import KeyHasher, issue_key
from .ledger import Ledger
from .limits import KEY_LIMIT_FIELDS, TEAM_LIMIT_FIELDS, limit_changes
from .schemas import KeyChange, KeyCreate, TeamChange, TeamCreate, validated
from .store import BadCursor, KeyRecord, Limits, RequestRecord, Team
from .store.requests import CSV_FIELDS

REQUESTS_PAGE = 100  # records a page of GET /admin/requests holds unless ``limit`` says
REQUESTS_PAGE_MAX = 1000


def json_response(value: Any, status: int = 200) -> Response:
    import orjson

    return Response(orjson.dumps(value), status, media_type="application/json")


def csv_response(content: str | AsyncIterator[str], name: str) -> Response:
    """A CSV download: whole, or streamed as ``content`` yields it."""
    headers = {"content-disposition": f'attachment; filename="{name}.csv"'}
    media_type = "text/csv; charset=utf-8"
    if isinstance(content, str):
        return Response(content, media_type=media_type, headers=headers)
    return StreamingResponse(content, media_type=media_type, headers=headers)


def error_response(error: ProxyError) -> Response:
    return Response(
        error.body(),
        error.status,
        headers=dict((k.decode(), v.decode()) for k, v in error.headers()),
    )


class Admin:
    def __init__(
        self, settings: Settings, ledger: Ledger, auth: Authenticator, hasher: KeyHasher
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.store = ledger.store
        self.auth = auth
        self.hasher = hasher
        self.models = {m.name for m in settings.policy.models}
        self.default_limits = settings.ledger.default_limits()
        self._context = {"models": frozenset(self.models)}

    def routes(self) -> list[Route]:
        return [
            Route("/admin/keys", self._guard(self.list_keys), methods=["GET"]),
            Route("/admin/keys", self._guard(self.create_key), methods=["POST"]),
            Route("/admin/keys/{key_id}", self._guard(self.get_key), methods=["GET"]),
            Route("/admin/keys/{key_id}", self._guard(self.update_key), methods=["PATCH"]),
            Route("/admin/keys/{key_id}", self._guard(self.revoke_key), methods=["DELETE"]),
            Route("/admin/teams", self._guard(self.list_teams), methods=["GET"]),
            Route("/admin/teams", self._guard(self.put_team), methods=["POST"]),
            Route("/admin/teams/{team}", self._guard(self.put_team), methods=["PATCH"]),
            Route("/admin/usage", self._guard(self.usage), methods=["GET"]),
            Route("/admin/requests", self._guard(self.requests), methods=["GET"]),
            Route("/v1/usage", self.own_usage, methods=["GET"]),
            Route("/usage", self.own_usage, methods=["GET"]),
        ]

    def _guard(self, handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            exchange_of(request.scope).route = "/admin"
            token = self.settings.auth.admin_token
            try:
                if not token:
                    raise NotFound("The admin API is off (no admin token configured).")
                if not bears(request.headers, token):
                    raise Unauthorized(
                        "This route needs the admin token.", code="invalid_admin_token"
                    )
                result: Response = await handler(request)
                return result
            except ProxyError as error:
                return error_response(error)

        return endpoint

    # keys ----------------------------------------------------------------------------
    async def list_keys(self, request: Request) -> Response:
        keys = await self.ledger.call("admin", self.store.keys)
        return json_response({"object": "list", "data": [k.public() for k in keys]})

    async def create_key(self, request: Request) -> Response:
        secret, record = await self.create(parse_json_object(await request.body()))
        return json_response({**record.public(), "key": secret}, 201)

    async def create(self, body: dict[str, Any]) -> tuple[str, KeyRecord]:
        """A new key from the fields of ``POST /admin/keys``: its secret, shown this once."""
        fields = validated(KeyCreate, body, self._context)
        secret, record = issue_key(
            self.hasher,
            fields.name,
            team=fields.team,
            limits=_limits(fields, self.default_limits, KEY_LIMIT_FIELDS),
            models=tuple(fields.models or ()),
        )
        if fields.team is not None:
            # A config team the store lost (a flushed Redis) is back before its new key
            # can spend, or the key would be bound by no team budget at all.
            await self.ledger.seed_team(fields.team)
        await self.ledger.call("admin", lambda: self.store.add_key(record))
        return secret, record

    async def get_key(self, request: Request) -> Response:
        record = await self._key(request)
        return json_response(record.public())

    async def update_key(self, request: Request) -> Response:
        record = await self._key(request)
        body = parse_json_object(await request.body())
        return json_response((await self.change(record, body)).public())

    async def change(self, record: KeyRecord, body: dict[str, Any]) -> KeyRecord:
        """``record`` with the changes of ``PATCH /admin/keys/{id}``."""
        fields = validated(KeyChange, body, self._context)
        sent = fields.model_fields_set
        if "team" in sent and fields.team != record.team:
            raise InvalidRequest(
                "A key's team is fixed at creation (its spend is counted there); "
                "issue a new key in the other team.",
                param="team",
            )
        changes: dict[str, Any] = {"limits": _limits(fields, record.limits, KEY_LIMIT_FIELDS)}
        if "name" in sent:
            changes["name"] = fields.name
        if "models" in sent:
            changes["models"] = tuple(fields.models or ())
        if "revoked" in sent:
            changes["revoked"] = fields.revoked
        updated = await self.ledger.call(
            "admin", lambda: self.store.update_key(record.id, **changes)
        )
        if updated is None:
            raise NotFound("No such key.")
        self.auth.forget(record.key_hash)
        return updated

    async def revoke_key(self, request: Request) -> Response:
        record = await self.revoke(await self._key(request))
        return json_response({"id": record.id, "object": "proxy.key", "revoked": True})

    async def revoke(self, record: KeyRecord) -> KeyRecord:
        await self.ledger.call("admin", lambda: self.store.update_key(record.id, revoked=True))
        self.auth.forget(record.key_hash)
        return record

    async def key(self, key_id: str) -> KeyRecord:
        record = await self.ledger.call("admin", lambda: self.store.key(key_id))
        if record is None:
            raise NotFound("No such key.")
        return record

    async def _key(self, request: Request) -> KeyRecord:
        return await self.key(request.path_params["key_id"])

    # teams ---------------------------------------------------------------------------
    async def list_teams(self, request: Request) -> Response:
        teams = await self.ledger.call("admin", self.store.teams)
        return json_response({"object": "list", "data": [t.public() for t in teams]})

    async def put_team(self, request: Request) -> Response:
        body = parse_json_object(await request.body())
        team, created = await self.set_team(request.path_params.get("team"), body)
        return json_response(team.public(), 201 if created else 200)

    async def set_team(self, name: str | None, body: dict[str, Any]) -> tuple[Team, bool]:
        """The team with the budgets ``body`` sets, and whether it is new."""
        fields: TeamCreate | TeamChange
        if name is None:
            fields = validated(TeamCreate, body)
            name = fields.name
        else:
            fields = validated(TeamChange, {**body, "name": body.get("name", name)})
            if fields.name != name:
                raise InvalidRequest(
                    "A team's name is that of its path; it cannot be changed.", param="name"
                )
        # A change to a config team the store lost starts from its seed, not from nothing.
        await self.ledger.seed_team(name)
        current = await self.ledger.call("admin", lambda: self.store.team(name))
        base = current.limits if current else Limits()
        team = Team(name, _limits(fields, base, TEAM_LIMIT_FIELDS))
        await self.ledger.call("admin", lambda: self.store.put_team(team))
        return team, current is None

    # usage ---------------------------------------------------------------------------
    async def usage(self, request: Request) -> Response:
        params = request.query_params
        query, result = await usage.report(self.ledger, params, self.models)
        if query.csv:
            return csv_response(usage.as_csv(result["rows"], query.by), f"usage-by-{query.by}")
        return json_response(result)

    # the per-request log -------------------------------------------------------------
    async def requests(self, request: Request) -> Response:
        query = request.query_params
        key, team = query.get("key") or None, query.get("team") or None
        cursor = query.get("cursor") or None
        limit = _page_size(query.get("limit"))
        as_csv = usage.wants_csv(query)
        records, after = await self.requests_page(key, team, limit, cursor)
        if as_csv:
            return csv_response(self._requests_csv(key, team, records, after), "requests")
        return json_response({"data": [r.public() for r in records], "next_cursor": after})

    async def requests_page(
        self, key: str | None, team: str | None, limit: int, cursor: str | None
    ) -> tuple[list[RequestRecord], str | None]:
        try:
            return await self.ledger.call(
                "admin", lambda: self.store.requests(key, team, limit, cursor)
            )
        except BadCursor:
            raise InvalidRequest(
                "'cursor' must be a next_cursor this route handed out.", param="cursor"
            ) from None

    async def _requests_csv(
        self,
        key: str | None,
        team: str | None,
        records: list[RequestRecord],
        after: str | None,
    ) -> AsyncIterator[str]:
        """Every matching record from the first page on, to the oldest the log holds:
        the export is bounded by the log's own cap, one store call a page."""
        yield usage.csv_text([CSV_FIELDS])
        while True:
            if records:
                yield usage.csv_text(r.csv_row() for r in records)
            if after is None:
                return
            records, after = await self.requests_page(key, team, REQUESTS_PAGE_MAX, after)

    async def own_usage(self, request: Request) -> Response:
        exchange_of(request.scope).route = "/v1/usage"
        try:
            caller = await self.auth.authenticate(request.headers)
            periods = self.ledger.periods()
            key = caller.key
            params = request.query_params
            if usage.wants_history(params):
                query = usage.parse_query(params, periods.day, by=False)
                rows = await usage.history(self.ledger, query, self.models, keys=[key])
                if query.csv:
                    return csv_response(usage.as_csv(rows, "key"), "usage")
                history = {"object": "proxy.usage_history", **query.public(), "rows": rows}
                return json_response({"key": key.public(), **history})
            result: dict[str, Any] = {
                "object": "proxy.usage",
                "key": key.public(),
                "day": periods.day,
                "month": periods.month,
                **await usage.tallies(self.ledger, "key", key.id, periods),
            }
            if key.team:
                result["team"] = {
                    "name": key.team,
                    **await usage.tallies(self.ledger, "team", key.team, periods),
                }
            return json_response(result)
        except ProxyError as error:
            return error_response(error)


def _page_size(value: str | None) -> int:
    if value is None:
        return REQUESTS_PAGE
    if not (value.isascii() and value.isdigit() and len(value) <= 4) or not (
        1 <= int(value) <= REQUESTS_PAGE_MAX
    ):
        raise InvalidRequest(
            f"'limit' must be a whole number from 1 to {REQUESTS_PAGE_MAX}.", param="limit"
        )
    return int(value)


def _limits(fields: BaseModel, base: Limits, names: tuple[str, ...]) -> Limits:
    """``base`` with the limits ``fields`` sets; null is no limit and 0 allows nothing."""
    sent = {name: getattr(fields, name) for name in names if name in fields.model_fields_set}
    return replace(base, **limit_changes(sent, names))
