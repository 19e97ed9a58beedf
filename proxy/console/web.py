"""The console's plumbing: templates, security headers, forms, and the guard every page
passes (signed in, same origin, CSRF token on every state-changing form)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from ..errors import ProxyError
from ..exchange import exchange_of
from ..money import usd_text
from ..store import Limits
from ..templating import environment
from .chart import dollars
from .session import COOKIE, Session, Sessions

log = logging.getLogger("apiyi_proxy")
FORM_BYTES = 16 * 1024  # the largest form the console takes
HEADERS = {
    # No inline script, no inline style, nothing from elsewhere.
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


@dataclass
class Page:
    """What a handler gets: the request, its session and, for a POST, its form."""

    request: Request
    session: Session
    lists: Mapping[str, list[str]] = field(default_factory=dict)  # every value of a field

    @property
    def form(self) -> dict[str, str]:
        """Each field's value (the last, if it was sent more than once)."""
        return {name: values[-1] for name, values in self.lists.items()}


Handler = Callable[[Page], Awaitable[Response]]


def _usd(micros: int | None) -> str:
    return "no limit" if micros is None else dollars(micros)


def _limit_fields(limits: Limits) -> dict[str, str]:
    """A form's limit fields as the limits stand: exact amounts, blank for no limit."""

    def text(value: int | None, money: bool = False) -> str:
        return "" if value is None else usd_text(value) if money else str(value)

    return {
        "daily_usd": text(limits.daily_micros, money=True),
        "monthly_usd": text(limits.monthly_micros, money=True),
        "rpm": text(limits.rpm),
        "concurrency": text(limits.concurrency),
    }


class Web:
    """Renders pages and guards the routes."""

    def __init__(self, sessions: Sessions | None) -> None:
        self.sessions = sessions
        self.env = environment("proxy.console", usd=_usd, limit_fields=_limit_fields)

    def render(
        self, name: str, status: int = 200, *, session: Session | None = None, **context: Any
    ) -> Response:
        context = {"error": None, "nav": "", "form": {}, **context}
        html = self.env.get_template(name).render(session=session, **context)
        return HTMLResponse(html, status, headers=HEADERS)

    def redirect(self, to: str) -> Response:
        return RedirectResponse(to, 303, headers=HEADERS)

    def problem(self, status: int, message: str, session: Session | None = None) -> Response:
        return self.render("problem.html", status, session=session, message=message)

    def session_of(self, request: Request) -> Session | None:
        if self.sessions is None:
            return None
        return self.sessions.check(request.cookies.get(COOKIE))

    def page(
        self,
        handler: Handler,
        *,
        changes: bool = False,
        signed_out: Callable[[], Response] | None = None,
    ) -> Callable[..., Any]:
        """``handler`` behind the guard: signed in, and for a change (a POST) from
        this origin with the session's CSRF token. Signed out, a page answers
        ``signed_out()`` if given, else sends the browser to the sign-in page."""

        async def endpoint(request: Request) -> Response:
            exchange_of(request.scope).route = "/console"
            if self.sessions is None:
                return self.off()
            session = self.session_of(request)
            if session is None:
                if changes:
                    return self.problem(401, "Signed out: sign in again, then repeat this.")
                return signed_out() if signed_out else self.redirect("/console")
            page = Page(request, session)
            if changes:
                refusal = await self.check_change(page)
                if refusal is not None:
                    return refusal
            try:
                return await handler(page)
            except ProxyError as error:
                return self.problem(error.status, error.message, session)

        return endpoint

    async def check_change(self, page: Page) -> Response | None:
        """Reads the form into ``page``; a refusal if the change may not be made."""
        request = page.request
        if not same_origin(request):
            return self.problem(403, "Refused: this form was sent from another site.")
        form = await read_form(request)
        if form is None:
            return self.problem(400, "Refused: send the form as the console's page does.")
        page.lists = form
        assert self.sessions is not None
        if not self.sessions.csrf_ok(page.session, page.form.get("csrf")):
            return self.problem(
                403, "Refused: the form's CSRF token is missing or stale. Reload the page.",
                page.session,
            )  # fmt: skip
        return None

    def off(self) -> Response:
        return self.problem(404, "The console is off: set APIYI_PROXY_ADMIN_TOKEN to turn it on.")


def same_origin(request: Request) -> bool:
    """False for a request a browser says came from another site."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def read_form(request: Request) -> dict[str, list[str]] | None:
    """An urlencoded form of at most ``FORM_BYTES``, or None."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_BYTES:
            return None
    if kind != "application/x-www-form-urlencoded" and (kind or body):
        return None  # an empty POST with no type is an empty form
    try:
        pairs = parse_qsl(
            body.decode(), keep_blank_values=True, strict_parsing=False, max_num_fields=200
        )
    except (UnicodeDecodeError, ValueError):
        return None
    form: dict[str, list[str]] = {}
    for name, value in pairs:
        form.setdefault(name, []).append(value)
    return form
