"""The web console at ``/console``: money seen and controlled from a browser.

Server-rendered (Jinja2, autoescaped), nothing loaded from elsewhere, one small script
for the copy button. Signed in with the admin token; see ``session`` for the cookie
and CSRF tokens, ``web`` for the guard, ``pages`` for what each page shows.
"""

from __future__ import annotations

from .pages import Console

__all__ = ["Console"]
