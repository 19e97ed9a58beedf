"""The admin API of a running proxy, as the command line calls it.

One blocking call per command, with the standard library's HTTP client. Everything
that can go wrong (no answer, an error answer, an answer that is not the proxy's) is
translated here into one ``AdminAPIError`` whose message is a single line that names
the proxy and never carries the token.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from .config import ADMIN_TOKEN_ENV, AdminTarget

TIMEOUT_SECONDS = 30.0


class AdminAPIError(Exception):
    """A call to the admin API failed; ``status`` is the HTTP status, None without one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect would carry the admin token to wherever it points.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class AdminClient:
    """Calls ``/admin/...`` on one proxy with its admin token."""

    def __init__(self, target: AdminTarget, timeout: float = TIMEOUT_SECONDS) -> None:
        self.url = target.url
        self._token = target.token
        self._timeout = timeout
        self._opener = urllib.request.build_opener(_NoRedirects)

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        query: dict[str, str] | None = None,
    ) -> Any:
        """The decoded JSON answer of ``method path``; ``AdminAPIError`` on any failure."""
        url = self.url + quote(path)
        if query:
            url += "?" + urlencode(query)
        request = urllib.request.Request(url, method=method)
        request.add_header("authorization", f"Bearer {self._token}")
        request.add_header("accept", "application/json")
        if body is not None:
            request.data = orjson.dumps(body)
            request.add_header("content-type", "application/json")
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                return self._decoded(response.status, response.read())
        except urllib.error.HTTPError as answer:
            with answer:
                raise self._refusal(answer.code, answer.read()) from None
        except urllib.error.URLError as exc:
            reason = _reason(exc.reason)
            raise AdminAPIError(f"cannot reach the proxy at {self.url}: {reason}") from None
        except TimeoutError:
            raise AdminAPIError(
                f"the proxy at {self.url} did not answer within {self._timeout:g} s"
            ) from None
        except (http.client.HTTPException, ConnectionError) as exc:
            raise AdminAPIError(f"the proxy at {self.url} broke off the answer: {exc!r}") from None

    def listing(self, path: str) -> list[Any]:
        """The ``data`` of a list answer (``{"object": "list", "data": [...]}``)."""
        answer = self.call("GET", path)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise AdminAPIError(f"{self.url}{path} answered no list: is it an apiyi-proxy?")
        return data

    def _decoded(self, status: int, body: bytes) -> Any:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise AdminAPIError(
                f"{self.url} answered {status} without JSON: is it an apiyi-proxy?", status
            ) from None

    def _refusal(self, status: int, body: bytes) -> AdminAPIError:
        message = ""
        try:
            error = orjson.loads(body).get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                message = error["message"]
        except (orjson.JSONDecodeError, AttributeError):
            pass
        if not message:
            message = "not an answer of the admin API: is it an apiyi-proxy?"
        if status == 401:
            message += f" Check {ADMIN_TOKEN_ENV}: it must be the proxy's admin token."
        # One line, whatever the answer held.
        line = " ".join(f"the proxy at {self.url} answered {status}: {message}".split())
        return AdminAPIError(line, status)


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason)
