"""The one pooled HTTP client to the upstream, behind a small interface.

``open_upstream(settings)`` picks the implementation (``upstream.client``); the rest of
the proxy sees only ``UpstreamClient.post`` (and ``get``, for the account endpoints) and
``UpstreamResponse``. Client library
exceptions are translated here, once, into ``TransportError`` whose ``maybe_billed``
says whether the upstream could have received (and so billed) the request:

- could not connect, the pool had no room, or the connection broke before the
  request was fully written: not billed;
- timed out or lost the connection after the request was sent: maybe billed.

The total deadline of a call (``upstream.total_timeout_seconds``) covers the client's
side too, so the forwarding code keeps it (``forward.py``); here are the per-step
timeouts of connecting and reading.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from typing import Any

from .config import UpstreamSettings

# Bodies are read in pieces of at most this size, and at most about twice this is
# buffered per call before reading pauses: a 20 MB image never sits in memory whole,
# and pieces this small are reused by the allocator rather than grow the heap.
READ_CHUNK = 64 * 1024


class TransportError(Exception):
    """The upstream call failed below HTTP."""

    def __init__(self, message: str, *, maybe_billed: bool, timeout: bool = False) -> None:
        super().__init__(message)
        self.maybe_billed = maybe_billed
        self.timeout = timeout


class UpstreamResponse(abc.ABC):
    status: int
    headers: Mapping[str, str]  # lower-case names

    @abc.abstractmethod
    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises ``TransportError``."""

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body (for small error bodies)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            parts.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
        return b"".join(parts)[:limit]

    @abc.abstractmethod
    async def close(self) -> None: ...


class _Written:
    """A streamed request body that remembers whether it was sent to the end."""

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        self._body = body
        self.done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._body:
            yield chunk
        self.done = True


class UpstreamClient(abc.ABC):
    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.base_url = settings.base_url.rstrip("/")

    @abc.abstractmethod
    async def post(
        self, path: str, headers: Mapping[str, str], body: bytes | AsyncIterator[bytes]
    ) -> UpstreamResponse:
        """Send a request; returns once the status and headers arrived."""

    @abc.abstractmethod
    async def get(self, path: str, headers: Mapping[str, str]) -> UpstreamResponse:
        """A GET without a body (nothing billed); returns once the status and headers
        arrived. Every failure is a ``TransportError`` with ``maybe_billed`` false."""

    @abc.abstractmethod
    async def close(self) -> None: ...


def open_upstream(settings: UpstreamSettings) -> UpstreamClient:
    if settings.client == "httpx":
        return _HttpxClient(settings)
    return _AiohttpClient(settings)


# aiohttp -----------------------------------------------------------------------------


class _AiohttpResponse(UpstreamResponse):
    def __init__(self, response: Any) -> None:
        self._response = response
        self.status = response.status
        self.headers = {k.lower(): v for k, v in response.headers.items()}

    async def chunks(self) -> AsyncIterator[bytes]:
        import aiohttp

        try:
            async for chunk in self._response.content.iter_chunked(READ_CHUNK):
                yield chunk
        except TimeoutError as exc:
            raise TransportError(
                "upstream read timed out", maybe_billed=True, timeout=True
            ) from exc
        except aiohttp.ClientError as exc:
            raise TransportError("upstream connection lost", maybe_billed=True) from exc

    async def close(self) -> None:
        self._response.release()


class _AiohttpClient(UpstreamClient):
    def __init__(self, settings: UpstreamSettings) -> None:
        super().__init__(settings)
        self._session: Any = None

    def _open(self) -> Any:
        import aiohttp

        # Created on first use so that it binds to the running loop.
        s = self.settings
        connector = aiohttp.TCPConnector(
            limit=s.max_connections,
            limit_per_host=0,
            keepalive_timeout=s.keepalive_seconds,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            read_bufsize=READ_CHUNK,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=s.connect_timeout, sock_read=s.read_timeout
            ),
            skip_auto_headers=("User-Agent",),
            raise_for_status=False,
        )
        return self._session

    async def post(
        self, path: str, headers: Mapping[str, str], body: bytes | AsyncIterator[bytes]
    ) -> UpstreamResponse:
        import aiohttp

        session = self._session or self._open()
        data = body if isinstance(body, bytes) else _Written(body)
        try:
            response = await session.post(self.base_url + path, data=data, headers=dict(headers))
        except aiohttp.ClientConnectorError as exc:
            raise TransportError("upstream unreachable", maybe_billed=False) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise TransportError("upstream connect timed out", maybe_billed=False) from exc
        except TimeoutError as exc:
            raise TransportError("upstream timed out", maybe_billed=True, timeout=True) from exc
        except aiohttp.ClientError as exc:
            # A small body leaves in one write with the headers; a streamed one is
            # known to have been sent only once its iterator ran to the end.
            sent = isinstance(data, bytes) or data.done
            raise TransportError("upstream connection lost", maybe_billed=sent) from exc
        return _AiohttpResponse(response)

    async def get(self, path: str, headers: Mapping[str, str]) -> UpstreamResponse:
        import aiohttp

        session = self._session or self._open()
        try:
            response = await session.get(self.base_url + path, headers=dict(headers))
        except TimeoutError as exc:
            raise TransportError("upstream timed out", maybe_billed=False, timeout=True) from exc
        except aiohttp.ClientError as exc:
            raise TransportError("upstream unreachable", maybe_billed=False) from exc
        return _AiohttpResponse(response)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


# httpx -------------------------------------------------------------------------------


class _HttpxResponse(UpstreamResponse):
    def __init__(self, response: Any) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = {k.lower(): v for k, v in response.headers.items()}

    async def chunks(self) -> AsyncIterator[bytes]:
        import httpx

        try:
            async for chunk in self._response.aiter_bytes():
                yield chunk
        except httpx.TimeoutException as exc:
            raise TransportError(
                "upstream read timed out", maybe_billed=True, timeout=True
            ) from exc
        except httpx.TransportError as exc:
            raise TransportError("upstream connection lost", maybe_billed=True) from exc

    async def close(self) -> None:
        await self._response.aclose()


class _HttpxClient(UpstreamClient):
    def __init__(self, settings: UpstreamSettings) -> None:
        super().__init__(settings)
        import httpx

        s = settings
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=s.max_connections,
                max_keepalive_connections=s.max_connections,
                keepalive_expiry=s.keepalive_seconds,
            ),
            timeout=httpx.Timeout(
                connect=s.connect_timeout, read=s.read_timeout, write=s.write_timeout, pool=30.0
            ),
            follow_redirects=False,
            trust_env=False,
        )

    async def post(
        self, path: str, headers: Mapping[str, str], body: bytes | AsyncIterator[bytes]
    ) -> UpstreamResponse:
        import httpx

        data = body if isinstance(body, bytes) else _Written(body)
        request = self._client.build_request(
            "POST", self.base_url + path, headers=dict(headers), content=data
        )
        try:
            response = await self._client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise TransportError("upstream unreachable", maybe_billed=False) from exc
        except httpx.TimeoutException as exc:
            raise TransportError("upstream timed out", maybe_billed=True, timeout=True) from exc
        except httpx.TransportError as exc:
            sent = isinstance(data, bytes) or data.done
            raise TransportError("upstream connection lost", maybe_billed=sent) from exc
        return _HttpxResponse(response)

    async def get(self, path: str, headers: Mapping[str, str]) -> UpstreamResponse:
        import httpx

        request = self._client.build_request("GET", self.base_url + path, headers=dict(headers))
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise TransportError("upstream timed out", maybe_billed=False, timeout=True) from exc
        except httpx.TransportError as exc:
            raise TransportError("upstream unreachable", maybe_billed=False) from exc
        return _HttpxResponse(response)

    async def close(self) -> None:
        await self._client.aclose()
