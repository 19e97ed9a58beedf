"""The console's pages: overview, keys, teams, usage and calls."""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import usage
from ..admin import Admin, csv_response
from ..auth import same_secret
from ..config import Settings
from ..errors import InvalidRequest
from ..exchange import exchange_of
from ..ledger import Ledger
from ..limits import KEY_LIMIT_FIELDS, TEAM_LIMIT_FIELDS
from ..metrics import Metrics
from ..store import KeyRecord, Tally
from .chart import Day, layout
from .session import COOKIE, SESSION_SECONDS, Sessions, SignInLimiter
from .web import HEADERS, Page, Web, read_form, same_origin

KEYS_PAGE = 50  # keys a page of the keys list shows
CALLS_PAGE = 50
CALLS_PAGE_MAX = 500
USAGE_ROWS = 500  # rows the usage page shows; the CSV has them all
CHART_DAYS = 30
MAX_FORM_NUMBER = 10**15  # past any limit the ledger takes, before a float would round
READ = usage.REPORT_TIMEOUT_SECONDS
STATIC = {
    "console.css": "text/css",
    "console.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}


@dataclass(frozen=True)
class Spend:
    """One key's or team's money today and this month."""

    day: Tally
    month: Tally


class Console:
    def __init__(self, settings: Settings, admin: Admin, ledger: Ledger, metrics: Metrics) -> None:
        token = settings.auth.admin_token
        self.token = token
        self.web = Web(Sessions(token) if token else None)
        self.limiter = SignInLimiter()
        self.admin = admin
        self.ledger = ledger
        self.store = ledger.store
        self.metrics = metrics
        self.models = sorted(admin.models)
        self.static = {
            name: importlib.resources.files(__package__).joinpath("static", name).read_bytes()
            for name in STATIC
        }

    def routes(self) -> list[Route]:
        page = self.web.page
        return [
            Route("/console", page(self.overview, signed_out=self.sign_in_page), methods=["GET"]),
            Route("/console/login", self.sign_in, methods=["POST"]),
            Route("/console/logout", page(self.sign_out, changes=True), methods=["POST"]),
            Route("/console/keys", page(self.keys), methods=["GET"]),
            Route("/console/keys", page(self.create_key, changes=True), methods=["POST"]),
            Route("/console/keys/{key_id}", page(self.key), methods=["GET"]),
            Route("/console/keys/{key_id}", page(self.change_key, changes=True), methods=["POST"]),
            Route("/console/keys/{key_id}/revoke", page(self.confirm_revoke), methods=["GET"]),
            Route(
                "/console/keys/{key_id}/revoke", page(self.revoke, changes=True), methods=["POST"]
            ),
            Route("/console/teams", page(self.teams), methods=["GET"]),
            Route("/console/teams", page(self.set_team, changes=True), methods=["POST"]),
            Route("/console/usage", page(self.usage), methods=["GET"]),
            Route("/console/usage.csv", page(self.usage_csv), methods=["GET"]),
            Route("/console/calls", page(self.calls), methods=["GET"]),
            Route("/console/static/{name}", self.asset, methods=["GET"]),
        ]

    # signing in and out ------------------------------------------------------------
    def sign_in_page(self) -> Response:
        return self.web.render("signin.html")

    async def sign_in(self, request: Request) -> Response:
        exchange_of(request.scope).route = "/console"
        web = self.web
        if web.sessions is None or self.token is None:
            return web.off()
        address = request.client.host if request.client else "unknown"
        wait = self.limiter.retry_after(address)
        if wait is not None:
            response = web.render(
                "signin.html", 429, error=f"Too many failed sign-ins: wait {math.ceil(wait)} s."
            )
            response.headers["retry-after"] = str(math.ceil(wait))
            return response
        form = await read_form(request) if same_origin(request) else None
        token = (form or {}).get("token", [""])[-1]
        if not token or not same_secret(token, self.token):
            self.limiter.failed(address)
            return web.render("signin.html", 401, error="That is not the admin token.")
        cookie, _ = web.sessions.issue()
        response = web.redirect("/console")
        response.set_cookie(
            COOKIE,
            cookie,
            max_age=SESSION_SECONDS,
            path="/console",
            httponly=True,
            samesite="strict",
            secure=_behind_tls(request),
        )
        return response

    async def sign_out(self, page: Page) -> Response:
        assert self.web.sessions is not None
        self.web.sessions.end(page.session)
        response = self.web.redirect("/console")
        response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict")
        return response

    async def asset(self, request: Request) -> Response:
        exchange_of(request.scope).route = "/console"
        name = request.path_params["name"]
        if name not in self.static:
            return self.web.problem(404, "No such file.")
        headers = {**HEADERS, "cache-control": "public, max-age=3600"}
        return Response(self.static[name], media_type=STATIC[name], headers=headers)

    # overview --------------------------------------------------------------------------
    async def overview(self, page: Page) -> Response:
        periods = self.ledger.periods()
        today = date.fromisoformat(periods.day)
        keys = await self.ledger.call("usage", self.store.keys, READ)
        first = today - timedelta(days=CHART_DAYS - 1)
        daily = await self._spend_by_period(first, today, "day")
        monthly = await self._spend_by_period(today.replace(day=1), today, "month")
        days = [daily.get(d, Day(d, 0, 0)) for d in usage.days(first, today)]
        month = monthly.get(periods.month, Day(periods.month, 0, 0))
        teams = await usage.team_names(self.ledger, keys)
        return self.web.render(
            "overview.html",
            session=page.session,
            nav="overview",
            periods=periods,
            today=days[-1],
            month=month,
            chart=layout(days),
            teams=[(name, await self._spend("team", name)) for name in teams],
            in_flight=await self.ledger.call("usage", self.store.holds_outstanding, READ),
            account=dict(self.metrics.account.micros),
            key_count=sum(1 for k in keys if not k.revoked),
        )

    async def _spend_by_period(
        self, start: date, end: date, period: Literal["day", "month"]
    ) -> dict[str, Day]:
        """Spend of every model added up per period of the range, by period name."""
        query = usage.Query(start, end, "model", period)
        rows = await usage.history(self.ledger, query, self.models)
        totals: dict[str, Day] = {}
        for row in rows:
            day = totals.get(row["period"], Day(row["period"], 0, 0))
            totals[row["period"]] = Day(
                day.day,
                day.spent + round(row["spent_usd"] * 1e6),
                day.uncertain + round(row["uncertain_usd"] * 1e6),
            )
        return totals

    async def _spend(self, scope: str, name: str) -> Spend:
        return Spend(*await usage.day_and_month(self.ledger, scope, name, self.ledger.periods()))

    # keys ------------------------------------------------------------------------------
    async def keys(self, page: Page, *, created: tuple[str, KeyRecord] | None = None,
                   error: InvalidRequest | None = None, status: int = 200) -> Response:  # fmt: skip
        params = page.request.query_params
        search = params.get("q", "").strip()[:100]
        keys = await self.ledger.call("usage", self.store.keys, READ)
        shown = sorted(
            (k for k in keys if _matches(k, search)), key=lambda k: (k.revoked, -k.created)
        )
        start = _whole(params.get("page"), 1) - 1
        first = start * KEYS_PAGE
        rows = [(k, await self._spend("key", k.id)) for k in shown[first : first + KEYS_PAGE]]
        return self.web.render(
            "keys.html",
            status,
            session=page.session,
            nav="keys",
            search=search,
            rows=rows,
            total=len(shown),
            page_number=start + 1,
            pages=max(1, math.ceil(len(shown) / KEYS_PAGE)),
            models=self.models,
            defaults=self.admin.default_limits,
            created=created,
            error=error,
            form=page.form if error else {},
        )

    async def create_key(self, page: Page) -> Response:
        form = page.form
        body: dict[str, Any] = {"name": form.get("name", "")}
        if form.get("team", "").strip():
            body["team"] = form["team"].strip()
        models = page.lists.get("models", [])
        if models:
            body["models"] = models
        try:
            body.update(_limits(form, KEY_LIMIT_FIELDS))
            created = await self.admin.create(body)
        except InvalidRequest as error:
            return await self.keys(page, error=error, status=400)
        return await self.keys(page, created=created, status=201)

    async def key(self, page: Page, *, error: InvalidRequest | None = None,
                  status: int = 200, saved: bool = False) -> Response:  # fmt: skip
        record = await self.admin.key(page.request.path_params["key_id"])
        return self.web.render(
            "key.html",
            status,
            session=page.session,
            nav="keys",
            key=record,
            spend=await self._spend("key", record.id),
            models=self.models,
            error=error,
            saved=saved,
        )

    async def change_key(self, page: Page) -> Response:
        record = await self.admin.key(page.request.path_params["key_id"])
        form = page.form
        try:
            body: dict[str, Any] = {
                "name": form.get("name", ""),
                "models": page.lists.get("models", []),
                **_limits(form, KEY_LIMIT_FIELDS),
            }
            await self.admin.change(record, body)
        except InvalidRequest as error:
            return await self.key(page, error=error, status=400)
        return await self.key(page, saved=True)

    async def confirm_revoke(self, page: Page) -> Response:
        record = await self.admin.key(page.request.path_params["key_id"])
        return self.web.render("revoke.html", session=page.session, nav="keys", key=record)

    async def revoke(self, page: Page) -> Response:
        record = await self.admin.revoke(await self.admin.key(page.request.path_params["key_id"]))
        return self.web.redirect(f"/console/keys/{record.id}")

    # teams -----------------------------------------------------------------------------
    async def teams(self, page: Page, *, error: InvalidRequest | None = None,
                    status: int = 200, saved: str | None = None) -> Response:  # fmt: skip
        keys = await self.ledger.call("usage", self.store.keys, READ)
        stored = {t.name: t for t in await self.ledger.call("usage", self.store.teams, READ)}
        rows = []
        for name in await usage.team_names(self.ledger, keys):
            members = sum(1 for k in keys if k.team == name and not k.revoked)
            rows.append((name, stored.get(name), members, await self._spend("team", name)))
        edit = page.request.query_params.get("edit", "")
        return self.web.render(
            "teams.html",
            status,
            session=page.session,
            nav="teams",
            rows=rows,
            edit=stored.get(edit),
            edit_name=edit if any(row[0] == edit for row in rows) else "",
            error=error,
            saved=saved,
            form=page.form if error else {},
        )

    async def set_team(self, page: Page) -> Response:
        try:
            form = page.form
            body = {"name": form.get("name", "").strip(), **_limits(form, TEAM_LIMIT_FIELDS)}
            team, _ = await self.admin.set_team(None, body)
        except InvalidRequest as error:
            return await self.teams(page, error=error, status=400)
        return await self.teams(page, saved=team.name)

    # usage and calls -------------------------------------------------------------------
    async def usage(self, page: Page) -> Response:
        params = _history_params(page.request.query_params)
        try:
            query, result = await usage.report(self.ledger, params, self.models)
        except InvalidRequest as error:
            return self.web.render(
                "usage.html", 400, session=page.session, nav="usage", error=error,
                query=None, rows=[], total=0, params=params, csv="",
            )  # fmt: skip
        rows = result["rows"]
        return self.web.render(
            "usage.html",
            session=page.session,
            nav="usage",
            error=None,
            query=query,
            rows=rows[:USAGE_ROWS],
            total=len(rows),
            spent=sum(round(r["spent_usd"] * 1e6) for r in rows),
            params=params,
            csv="/console/usage.csv?" + str(page.request.query_params),
        )

    async def usage_csv(self, page: Page) -> Response:
        params = _history_params(page.request.query_params)
        query, result = await usage.report(self.ledger, params, self.models)
        return csv_response(usage.as_csv(result["rows"], query.by), f"usage-by-{query.by}")

    async def calls(self, page: Page) -> Response:
        params = page.request.query_params
        key, team = params.get("key") or None, params.get("team") or None
        cursor = params.get("cursor") or None
        size = min(_whole(params.get("limit"), CALLS_PAGE), CALLS_PAGE_MAX)
        records, after = await self.admin.requests_page(key, team, size, cursor)
        keys = await self.ledger.call("usage", self.store.keys, READ)
        return self.web.render(
            "calls.html",
            names={k.id: k.name for k in keys},
            session=page.session,
            nav="calls",
            records=records,
            key=key or "",
            team=team or "",
            after=after,
            first_page=cursor is None,
            limit="" if size == CALLS_PAGE else str(size),
        )


def _behind_tls(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip()
    return request.url.scheme == "https" or forwarded == "https"


def _matches(key: KeyRecord, search: str) -> bool:
    if not search:
        return True
    needle = search.lower()
    return any(needle in (text or "").lower() for text in (key.name, key.id, key.team, key.display))


def _whole(text: str | None, default: int) -> int:
    if text and text.isascii() and text.isdigit() and len(text) < 7:
        return max(1, int(text))
    return default


def _limits(form: Mapping[str, str], fields: tuple[str, ...]) -> dict[str, Any]:
    """The limits a form sets, as the admin API takes them: a blank field is no limit."""
    values: dict[str, Any] = {}
    for name in fields:
        if name not in form:
            continue
        text = form[name].strip().removeprefix("$").replace(",", "")
        if not text:
            values[name] = None
            continue
        try:
            number = Decimal(text)
        except InvalidOperation:
            number = None
        if number is None or not number.is_finite():
            raise InvalidRequest(f"'{name}' must be a number, or blank for no limit.", param=name)
        if abs(number) > MAX_FORM_NUMBER:
            raise InvalidRequest(f"'{name}' is too large.", param=name)
        values[name] = int(number) if number == number.to_integral_value() else float(number)
    return values


def _history_params(params: Mapping[str, str]) -> dict[str, str]:
    """The usage page's form: ``from``, ``to``, ``by``, ``period`` and ``team`` (the
    keys of one team, or that team alone), blank ones left to their defaults."""
    chosen = {
        name: params[name].strip()
        for name in ("from", "to", "by", "period", "team")
        if params.get(name, "").strip()
    }
    chosen.setdefault("period", "day")  # a history, never the all-keys totals
    return chosen
