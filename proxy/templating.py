"""The one boundary with Jinja2: the console's pages and the docs page are rendered
through environments made here, always autoescaped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jinja2


def environment(
    package: str, *, strict: bool = True, **filters: Callable[..., Any]
) -> jinja2.Environment:
    """Templates from ``package``'s ``templates`` folder, with ``filters``; ``strict``
    makes a missing value an error (a page's own context), else blank (a document's
    optional fields)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(package, "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined if strict else jinja2.Undefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(filters)
    return env
