"""The proxy's own API as an OpenAPI 3.1 document, and its docs page.

Built once, when the app is: the schemas come from the models that validate the
request bodies (``proxy.schemas``) and from those describing the answers
(``proxy.response_models``); the paths list every route but the console's and the
fake upstream's, with every status each can answer. ``/docs`` is rendered from the
same document, server-side, and loads nothing from anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from . import response_models as answers
from . import schemas
from .admin import REQUESTS_PAGE_MAX
from .config import Settings
from .templating import environment

REF = "#/components/schemas/{model}"
# The docs page may load its own style sheet and nothing else, from nowhere else.
DOCS_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
DOCS_CSS_PATH = "/docs/docs.css"

REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    schemas.KeyCreate,
    schemas.KeyChange,
    schemas.TeamCreate,
    schemas.TeamChange,
    schemas.ImageGeneration,
    schemas.ImageEdit,
)
ANSWER_MODELS: tuple[type[BaseModel], ...] = (
    answers.Error,
    answers.Key,
    answers.CreatedKey,
    answers.KeyList,
    answers.RevokedKey,
    answers.Team,
    answers.TeamList,
    answers.UsageReport,
    answers.OwnUsage,
    answers.OwnHistory,
    answers.RequestPage,
    answers.Model,
    answers.ModelList,
    answers.Images,
    answers.Status,
)

ERRORS = {
    400: "The request is invalid; `param` names the field.",
    401: "No valid credentials.",
    403: "The key may not do this (e.g. `model_not_allowed`).",
    404: "Not found.",
    409: "An identical call with the same Idempotency-Key is still running.",
    413: "The body is larger than the limit.",
    422: "The Idempotency-Key was used with another body.",
    429: "A rate, concurrency or budget limit (`budget_exceeded`) was reached.",
    502: "The upstream failed or answered with something unusable.",
    503: "The store is unreachable (fail closed); retry after `retry-after`.",
    504: "The upstream took too long; it may have billed, so do not retry blindly.",
    "4XX": "The upstream's own refusal, passed on with its status.",
}
ADMIN_ERRORS = (401, 404, 503)  # 404 also when the admin API is off
IMAGE_ERRORS = (400, 401, 403, 409, 413, 422, 429, 502, 503, 504, "4XX")
Security = list[dict[str, list[str]]]
ADMIN: Security = [{"adminToken": []}]
CLIENT: Security = [{"clientKey": []}]


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


CSV = {"text/csv": {"schema": {"type": "string"}}}
REQUEST_ID = {
    "x-request-id": {
        "description": "The proxy's id of this request.",
        "required": True,
        "schema": {"type": "string"},
    }
}


@dataclass(frozen=True)
class Param:
    name: str
    where: str
    schema: dict[str, Any]
    description: str
    required: bool = False

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": self.where,
            "required": self.required or self.where == "path",
            "description": self.description,
            "schema": self.schema,
        }


def query(name: str, description: str, **schema: Any) -> Param:
    return Param(name, "query", {"type": "string", **schema}, description)


def path(name: str, description: str) -> Param:
    return Param(name, "path", {"type": "string"}, description, required=True)


PERIOD_NAME = r"^[0-9]{4}-[0-9]{2}(-[0-9]{2})?$"
HISTORY = (
    query("from", "First day (YYYY-MM-DD) or month (YYYY-MM).", pattern=PERIOD_NAME),
    query("to", "Last day (YYYY-MM-DD) or month (YYYY-MM); default today.", pattern=PERIOD_NAME),
    query("period", "Rows per day or per month.", enum=["day", "month"]),
    query("format", "json (default) or csv.", enum=["json", "csv"]),
)
BY = query("by", "Rows per key, team or model.", enum=["key", "team", "model"])
NARROW = (query("key", "Only this key id."), query("team", "Only this team."))
REQUEST_LOG = (
    *NARROW,
    Param(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "maximum": REQUESTS_PAGE_MAX},
        "Page size.",
    ),
    query("cursor", "The next_cursor of the page before."),
    query("format", "json (a page) or csv (the whole filtered log).", enum=["json", "csv"]),
)
IDEMPOTENCY = Param(
    "Idempotency-Key",
    "header",
    {"type": "string", "maxLength": 255},
    "A finished duplicate replays the stored answer, without charge.",
)


def operation(
    operation_id: str,
    summary: str,
    tag: str,
    ok: dict[int | str, tuple[str, dict[str, Any]]],
    errors: tuple[int | str, ...] = (),
    *,
    security: Security | None = None,
    body: dict[str, Any] | None = None,
    params: tuple[Param, ...] = (),
    description: str = "",
) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, (text, content) in ok.items():
        responses[str(status)] = {"description": text, "headers": REQUEST_ID, "content": content}
    for status in errors:
        responses[str(status)] = {
            "description": ERRORS[status],
            "headers": REQUEST_ID,
            "content": json_content(ref(answers.Error)),
        }
    spec: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        "security": security if security is not None else [],
        "responses": responses,
    }
    if description:
        spec["description"] = description
    if params:
        spec["parameters"] = [p.spec() for p in params]
    if body is not None:
        spec["requestBody"] = {"required": True, "content": body}
    return spec


def _components(mode_of: list[tuple[type[BaseModel], JsonSchemaMode]]) -> dict[str, Any]:
    _, found = models_json_schema(mode_of, ref_template=REF)
    return dict(found.get("$defs", {}))


def document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a proxy with ``settings``."""
    schemas_ = _components(
        [(m, "validation") for m in REQUEST_MODELS] + [(m, "serialization") for m in ANSWER_MODELS]
    )
    _fit_to(settings, schemas_)
    metrics_security: Security = [{"metricsToken": []}] if settings.auth.metrics_token else []
    paths: dict[str, dict[str, Any]] = {}

    def add(path_: str, method: str, spec: dict[str, Any]) -> None:
        paths.setdefault(path_, {})[method] = spec

    for prefix in ("/v1", ""):
        twin = "" if prefix else " (the same without /v1)"
        suffix = "" if prefix else "Unversioned"
        add(
            f"{prefix}/images/generations",
            "post",
            operation(
                f"createImage{suffix}",
                "Generate an image through the upstream" + twin,
                "images",
                {200: ("The upstream's image, OpenAI's shape.", json_content(ref(answers.Images)))},
                IMAGE_ERRORS,
                security=CLIENT,
                body=json_content(ref(schemas.ImageGeneration)),
                params=(IDEMPOTENCY,),
                description="x-proxy-adjusted reports what the policy changed.",
            ),
        )
        add(
            f"{prefix}/images/edits",
            "post",
            operation(
                f"createImageEdit{suffix}",
                "Edit images through the upstream" + twin,
                "images",
                {200: ("The upstream's image, OpenAI's shape.", json_content(ref(answers.Images)))},
                IMAGE_ERRORS,
                security=CLIENT,
                body={"multipart/form-data": {"schema": ref(schemas.ImageEdit)}},
                params=(IDEMPOTENCY,),
            ),
        )
        add(
            f"{prefix}/models",
            "get",
            operation(
                f"listModels{suffix}",
                "The served models and their aliases" + twin,
                "models",
                {200: ("OpenAI's list shape.", json_content(ref(answers.ModelList)))},
            ),
        )
        add(
            f"{prefix}/models/{{model_id}}",
            "get",
            operation(
                f"retrieveModel{suffix}",
                "One model or alias" + twin,
                "models",
                {200: ("OpenAI's model shape.", json_content(ref(answers.Model)))},
                (404,),
                params=(path("model_id", "A model or an alias."),),
            ),
        )
        own = {**json_content({"oneOf": [ref(answers.OwnUsage), ref(answers.OwnHistory)]}), **CSV}
        add(
            f"{prefix}/usage",
            "get",
            operation(
                f"ownUsage{suffix}",
                "The calling key's spend, limits and remaining budget" + twin,
                "usage",
                {200: ("Today and this month, or the history asked for.", own)},
                (400, 401, 503),
                security=CLIENT,
                params=HISTORY,
            ),
        )

    add("/admin/keys", "get", operation(
        "listKeys", "Every client key", "admin",
        {200: ("The keys, never their secrets.", json_content(ref(answers.KeyList)))},
        ADMIN_ERRORS, security=ADMIN,
    ))  # fmt: skip
    add("/admin/keys", "post", operation(
        "createKey", "Issue a client key", "admin",
        {201: ("The key, with its secret shown this once.", json_content(
            ref(answers.CreatedKey)))},
        (400, *ADMIN_ERRORS), security=ADMIN, body=json_content(ref(schemas.KeyCreate)),
    ))  # fmt: skip
    key_id = (path("key_id", "The key's id."),)
    add("/admin/keys/{key_id}", "get", operation(
        "getKey", "One client key", "admin",
        {200: ("The key.", json_content(ref(answers.Key)))},
        ADMIN_ERRORS, security=ADMIN, params=key_id,
    ))  # fmt: skip
    add("/admin/keys/{key_id}", "patch", operation(
        "updateKey", "Change a client key", "admin",
        {200: ("The key as changed.", json_content(ref(answers.Key)))},
        (400, *ADMIN_ERRORS), security=ADMIN, params=key_id,
        body=json_content(ref(schemas.KeyChange)),
    ))  # fmt: skip
    add("/admin/keys/{key_id}", "delete", operation(
        "revokeKey", "Revoke a client key", "admin",
        {200: ("Revoked.", json_content(ref(answers.RevokedKey)))},
        ADMIN_ERRORS, security=ADMIN, params=key_id,
    ))  # fmt: skip
    add("/admin/teams", "get", operation(
        "listTeams", "Every team", "admin",
        {200: ("The teams.", json_content(ref(answers.TeamList)))},
        ADMIN_ERRORS, security=ADMIN,
    ))  # fmt: skip
    team_answers: dict[int | str, tuple[str, dict[str, Any]]] = {
        200: ("The team as changed.", json_content(ref(answers.Team))),
        201: ("The team, new.", json_content(ref(answers.Team))),
    }
    add("/admin/teams", "post", operation(
        "createTeam", "Create a team, or change the budgets it sends", "admin",
        team_answers, (400, *ADMIN_ERRORS), security=ADMIN,
        body=json_content(ref(schemas.TeamCreate)),
    ))  # fmt: skip
    add("/admin/teams/{team}", "patch", operation(
        "updateTeam", "Change a team's budgets (creating it if absent)", "admin",
        team_answers, (400, *ADMIN_ERRORS), security=ADMIN,
        params=(path("team", "The team's name."),), body=json_content(ref(schemas.TeamChange)),
    ))  # fmt: skip
    add("/admin/usage", "get", operation(
        "usage", "Spend per key and team; the history by key, team or model", "admin",
        {200: ("The report, or its rows as CSV.", {
            **json_content(ref(answers.UsageReport)), **CSV})},
        (400, *ADMIN_ERRORS), security=ADMIN, params=(*HISTORY, BY, *NARROW),
    ))  # fmt: skip
    add("/admin/requests", "get", operation(
        "requests", "The per-request log, newest first", "admin",
        {200: ("A page, or the whole filtered log as CSV.", {
            **json_content(ref(answers.RequestPage)), **CSV})},
        (400, *ADMIN_ERRORS), security=ADMIN, params=REQUEST_LOG,
    ))  # fmt: skip

    status = json_content(ref(answers.Status))
    add("/healthz", "get", operation("healthz", "Liveness", "operations", {200: ("Up.", status)}))
    add("/readyz", "get", operation(
        "readyz", "Readiness: the store answers", "operations",
        {200: ("Ready.", status)}, (503,),
    ))  # fmt: skip
    if settings.server.metrics_port is None:
        add("/metrics", "get", operation(
            "metrics", "Prometheus exposition", "operations",
            {200: ("The metrics.", {"text/plain": {"schema": {"type": "string"}}})},
            (401,) if metrics_security else (), security=metrics_security,
        ))  # fmt: skip
    add("/openapi.json", "get", operation(
        "openapi", "This document", "operations",
        {200: ("OpenAPI 3.1.", json_content({"type": "object"}))},
    ))  # fmt: skip
    add("/docs", "get", operation(
        "docs", "This document as a page", "operations",
        {200: ("HTML.", {"text/html": {"schema": {"type": "string"}}})},
    ))  # fmt: skip
    add(DOCS_CSS_PATH, "get", operation(
        "docsStyle", "The docs page's style sheet", "operations",
        {200: ("CSS.", {"text/css": {"schema": {"type": "string"}}})},
    ))  # fmt: skip

    bearer = "http"
    security_schemes: dict[str, Any] = {
        "clientKey": {"type": bearer, "scheme": "bearer", "description": "A client key."},
        "adminToken": {
            "type": bearer,
            "scheme": "bearer",
            "description": "APIYI_PROXY_ADMIN_TOKEN; never a client key.",
        },
    }
    if metrics_security:
        security_schemes["metricsToken"] = {"type": bearer, "scheme": "bearer"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "apiyi-proxy",
            "version": _version(),
            "description": "An OpenAI-compatible validating proxy for the apiyi image API: "
            "the proxied image routes, the models, a key's usage, and the admin API.",
        },
        "paths": paths,
        "components": {"schemas": schemas_, "securitySchemes": security_schemes},
    }


def _fit_to(settings: Settings, found: dict[str, Any]) -> None:
    """What this proxy's config decides: the longest prompt and the largest n."""
    policy = settings.policy
    for name in ("ImageGeneration", "ImageEdit"):
        found[name]["properties"]["prompt"]["maxLength"] = policy.max_prompt_chars
    n = found["ImageGeneration"]["properties"]["n"]["anyOf"][0]
    n["maximum"] = policy.max_n


def _version() -> str:
    from . import __version__

    return __version__


# The docs page -----------------------------------------------------------------------


@dataclass(frozen=True)
class DocsPage:
    """``/openapi.json``, ``/docs`` and its style sheet, each rendered once."""

    json: bytes
    html: str
    css: str


def docs_page(settings: Settings) -> DocsPage:
    spec = document(settings)
    env = environment("proxy", strict=False, pretty=_pretty)
    html = env.get_template("docs.html").render(
        spec=spec, css=DOCS_CSS_PATH.lstrip("/"), operations=list(_operations(spec))
    )
    css = resources.files("proxy").joinpath("templates/docs.css").read_text("utf-8")
    return DocsPage(orjson.dumps(spec), html, css)


def _pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def _operations(spec: dict[str, Any]) -> Any:
    for path_, methods in spec["paths"].items():
        for method, op in methods.items():
            yield {"path": path_, "method": method.upper(), **op}
