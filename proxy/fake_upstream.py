"""A faithful local stand-in for the upstream image API (SPEC section 2).

It follows the provider's rules, traps included: it checks the bearer key, knows both
models and the 30 ``gpt-image-2-vip`` sizes, refuses any size separator but a
lowercase ``x`` (``×`` gets the provider-family 400), refuses ``quality``,
``aspect_ratio`` and any other unknown field, *bills* ``n`` and returns one image,
returns ``b64_json`` with the ``data:image/png;base64,`` prefix (a real PNG), and omits
``created`` from ``gpt-image-2-all`` answers. What it billed is at ``GET /_fake/billing``.

Faults and sizes are chosen per request by directives in the prompt (they pass through
the proxy untouched): ``[fake:latency=S]``, ``[fake:image-bytes=N]``, ``[fake:timeout]``
(billed, never answers), ``[fake:reset]`` (billed, connection dropped), ``[fake:500]``,
``[fake:429]``, ``[fake:quota]``, ``[fake:moderation]``, ``[fake:error200]`` (a 200
carrying an error), ``[fake:no-created]``, ``[fake:cut=N]`` (billed, a 200 whose body
breaks off after N bytes), ``[fake:trickle=S]`` (billed, a 200 whose body comes one
byte every S seconds, so no read ever times out), ``[fake:code=N]`` (a 400 with the code
``code_N``). ``fail_rate`` injects the same faults at random; ``echo_secrets`` puts the
bearer and address it was reached with into every field of every error. Its size table
is its own copy, deliberately independent of the proxy's.

It serves the account endpoints of the provider family from its billing log: the
quota (``balance_usd``) at ``GET /v1/dashboard/billing/subscription`` and what the log
adds up to at ``GET /v1/dashboard/billing/usage`` (in 0.01 USD, each billed image at
its model's price). ``POST /_fake/bill`` bills images that no request asked for, as an
upstream that overcharges would; with ``account`` off both endpoints answer 404, as a
provider that does not serve them does.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import re
import secrets
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

VIP_SIZES = frozenset("""
1280x1280 848x1280 1280x848 960x1280 1280x960 1024x1280 1280x1024 720x1280 1280x720 1280x544
2048x2048 1360x2048 2048x1360 1536x2048 2048x1536 1632x2048 2048x1632 1152x2048 2048x1152 2048x864
2880x2880 2336x3520 3520x2336 2480x3312 3312x2480 2560x3216 3216x2560 2160x3840 3840x2160 3840x1632
""".split())  # fmt: skip
MODELS = ("gpt-image-2-vip", "gpt-image-2-all")
ACCEPTED = frozenset({"model", "prompt", "size", "response_format", "n"})
FAULTS = ("timeout", "reset", "500", "429", "quota", "moderation", "error200")
_DIRECTIVE = re.compile(r"\[fake:([a-z0-9-]+)(?:=([0-9.]+))?\]")
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
_COUNT = re.compile(r"[0-9]{1,5}")  # ASCII only: "²".isdigit(), but int("²") raises
CHUNK = 64 * 1024
PRICE_USD = 0.03  # per image, both models, unless the fake is given prices
Handler = Callable[[Request], Awaitable[Response]]


def check_generation(body: object) -> str | None:
    """Why the upstream would refuse this body, or None if it accepts it."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    unknown = sorted(set(body) - ACCEPTED)
    if unknown:
        return f"Unknown parameter: {unknown[0]}"
    if body.get("model") not in MODELS:
        return "model_not_found"
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return "prompt is required"
    if "response_format" in body and body["response_format"] not in ("url", "b64_json"):
        return "invalid response_format"
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return "invalid n"
    return _check_size(body["model"], body.get("size"))


def _check_size(model: str, size: object) -> str | None:
    if size is None or size == "auto":
        return None
    if not isinstance(size, str):
        return "invalid size"
    if model == "gpt-image-2-vip":
        return None if size in VIP_SIZES else f"invalid size {size!r}"
    match = _SIZE.fullmatch(size)
    if match is None:
        return f"invalid size {size!r}"
    w, h = int(match[1]), int(match[2])
    return None if min(w, h) >= 1 and 512 <= max(w, h) <= 1536 else f"invalid size {size!r}"


def make_png(total_bytes: int = 0) -> bytes:
    """A real 8x8 PNG, padded with a private ancillary chunk to about ``total_bytes``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 32, y * 32, 128)) for x in range(8)) for y in range(8)
    )
    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    body = chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    pad = total_bytes - len(head) - len(body) - 12
    if pad > 0:
        head += chunk(b"prVt", b"\x00" * pad)
    return head + body


class FakeUpstream:
    """Behaviour settings and the billing log of one fake upstream."""

    def __init__(
        self,
        api_key: str | None = "sk-fake-upstream",
        latency: float = 0.0,
        fail_rate: float = 0.0,
        image_bytes: int = 0,
        seed: int | None = None,
        balance_usd: float = 100.0,
        account: bool = True,
        prices: Mapping[str, float] | None = None,
    ) -> None:
        self.api_key = api_key
        self.latency = latency
        self.fail_rate = fail_rate
        self.image_bytes = image_bytes
        self.echo_secrets = False
        self.balance_usd = balance_usd  # the account's quota (hard_limit_usd)
        self.account = account  # False: the account endpoints answer 404
        self.prices = dict(prices or dict.fromkeys(MODELS, PRICE_USD))
        self.random = random.Random(seed)
        self.requests: list[dict[str, Any]] = []
        self.images_billed = 0
        self.billed_micros = 0  # what the billed images cost, in micro-USD
        self._b64: dict[int, bytes] = {}

    def b64_png(self, size: int) -> bytes:
        if size not in self._b64:
            self._b64[size] = base64.b64encode(make_png(size))
        return self._b64[size]

    def bill(self, entry: dict[str, Any]) -> None:
        n = entry.get("n")
        images = n if isinstance(n, int) and n > 0 else 1
        self.images_billed += images
        price = self.prices.get(entry.get("model") or "", PRICE_USD)
        self.billed_micros += images * round(price * 1_000_000)
        entry["billed"] = True

    def billing(self) -> dict[str, Any]:
        return {"images_billed": self.images_billed, "requests": self.requests}

    def subscription(self) -> dict[str, Any]:
        return {
            "object": "billing_subscription",
            "has_payment_method": True,
            "hard_limit_usd": self.balance_usd,
            "soft_limit_usd": self.balance_usd,
            "system_hard_limit_usd": self.balance_usd,
            "access_until": 0,
        }

    def usage(self) -> dict[str, Any]:
        # The provider counts usage in 0.01 USD.
        return {"object": "list", "total_usage": self.billed_micros / 10_000}

    def reset(self) -> None:
        self.requests.clear()
        self.images_billed = 0
        self.billed_micros = 0


def _error(
    status: int,
    message: str,
    code: str,
    type_: str = "new_api_error",
    headers: dict[str, str] | None = None,
) -> Response:
    rid = secrets.token_hex(8)
    body = {
        "error": {
            "message": f"{message} (request id: {rid})",
            "type": type_,
            "param": "",
            "code": code,
        }
    }
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


def create_fake_app(fake: FakeUpstream) -> Starlette:
    @_echoing(fake)
    async def generations(request: Request) -> Response:
        if (denied := _auth(fake, request)) is not None:
            return denied
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "invalid JSON body", "invalid_request")
        return await _generate(fake, request, body, route="generations", images=[])

    @_echoing(fake)
    async def edits(request: Request) -> Response:
        if (denied := _auth(fake, request)) is not None:
            return denied
        fields: dict[str, Any] = {}
        images: list[bytes] = []
        async with request.form(max_files=32) as form:
            for name, value in form.multi_items():
                if isinstance(value, str):
                    fields[name] = int(value) if name == "n" and _COUNT.fullmatch(value) else value
                elif name in ("image", "image[]"):
                    images.append(await value.read())
                else:
                    return _error(400, f"Unknown parameter: {name}", "invalid_request")
        if not 1 <= len(images) <= 16:
            return _error(400, "1 to 16 images are required", "invalid_request")
        if any(not i.startswith((b"\x89PNG", b"\xff\xd8\xff", b"RIFF")) for i in images):
            return _error(400, "images must be png, jpeg or webp", "invalid_image")
        digests = [hashlib.sha256(i).hexdigest()[:16] for i in images]
        return await _generate(fake, request, fields, route="edits", images=digests)

    async def models(request: Request) -> Response:
        data = [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "fake"}
            for m in MODELS
        ]
        return Response(
            orjson.dumps({"object": "list", "data": data}), media_type="application/json"
        )

    async def billing(request: Request) -> Response:
        return Response(orjson.dumps(fake.billing()), media_type="application/json")

    @_echoing(fake)
    async def subscription(request: Request) -> Response:
        return _account(fake, request, fake.subscription)

    @_echoing(fake)
    async def usage(request: Request) -> Response:
        return _account(fake, request, fake.usage)

    async def bill(request: Request) -> Response:
        """Bill ``images`` of ``model`` with no request behind them."""
        values = orjson.loads(await request.body() or b"{}")
        images = values.get("images", 1)
        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            return _error(400, "images must be a whole number >= 1", "invalid_request")
        entry: dict[str, Any] = {
            "route": "unrequested",
            "model": values.get("model", MODELS[0]),
            "size": None,
            "n": images,
            "response_format": None,
            "billed": False,
            "outcome": "ok",
        }
        fake.requests.append(entry)
        fake.bill(entry)
        return Response(orjson.dumps(fake.billing()), media_type="application/json")

    async def reset(request: Request) -> Response:
        fake.reset()
        return Response(b"{}", media_type="application/json")

    async def configure(request: Request) -> Response:
        values = orjson.loads(await request.body() or b"{}")
        for name in (
            "latency",
            "fail_rate",
            "image_bytes",
            "echo_secrets",
            "balance_usd",
            "account",
        ):
            if name in values:
                setattr(fake, name, values[name])
        return Response(b"{}", media_type="application/json")

    return Starlette(
        routes=[
            Route("/v1/images/generations", generations, methods=["POST"]),
            Route("/v1/images/edits", edits, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/dashboard/billing/subscription", subscription, methods=["GET"]),
            Route("/v1/dashboard/billing/usage", usage, methods=["GET"]),
            Route("/_fake/billing", billing, methods=["GET"]),
            Route("/_fake/bill", bill, methods=["POST"]),
            Route("/_fake/reset", reset, methods=["POST"]),
            Route("/_fake/config", configure, methods=["POST"]),
        ]
    )


def _echoing(fake: FakeUpstream) -> Callable[[Handler], Handler]:
    """With ``echo_secrets`` on, every field of every error carries the bearer and the
    address the fake was reached with, as a careless upstream would leak them."""

    def wrap(handler: Handler) -> Handler:
        async def echoing(request: Request) -> Response:
            response = await handler(request)
            if not fake.echo_secrets or not bytes(response.body).startswith(b'{"error"'):
                return response
            netloc = request.url.netloc
            leak = f"{request.headers.get('authorization', '')} {netloc} {request.base_url}"
            error = orjson.loads(response.body)["error"]
            error.update(
                message=f"{error['message']} [{leak}]",
                type=leak,
                param=leak,
                code=f"{error['code']}:{leak}",
            )
            response.body = orjson.dumps({"error": error})
            response.headers["content-length"] = str(len(response.body))
            return response

        return echoing

    return wrap


def _auth(fake: FakeUpstream, request: Request) -> Response | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    ok = (
        scheme.lower() == "bearer"
        and bool(token)
        and (fake.api_key is None or secrets.compare_digest(token, fake.api_key))
    )
    return None if ok else _error(401, "Invalid token", "invalid_api_key")


def _account(
    fake: FakeUpstream, request: Request, answer: Callable[[], dict[str, Any]]
) -> Response:
    if not fake.account:
        return _error(404, f"Invalid URL (GET {request.url.path})", "not_found")
    if (denied := _auth(fake, request)) is not None:
        return denied
    return Response(orjson.dumps(answer()), media_type="application/json")


async def _generate(
    fake: FakeUpstream, request: Request, body: Any, *, route: str, images: list[str]
) -> Response:
    entry: dict[str, Any] = {
        "route": route,
        "model": body.get("model") if isinstance(body, dict) else None,
        "size": body.get("size") if isinstance(body, dict) else None,
        "n": body.get("n") if isinstance(body, dict) else None,
        "response_format": body.get("response_format") if isinstance(body, dict) else None,
        "billed": False,
    }
    if images:
        # How many images an edit carried, and which, in the order received.
        entry["images"] = len(images)
        entry["image_sha256"] = images
    fake.requests.append(entry)
    problem = check_generation(body)
    if problem is not None:
        entry["outcome"] = "rejected"
        code = (
            "model_not_found"
            if problem == "model_not_found"
            else ("invalid_size" if "size" in problem else "invalid_request")
        )
        return _error(400, problem, code)
    prompt = body["prompt"]
    directives = {m[1]: m[2] for m in _DIRECTIVE.finditer(prompt)}
    if "code" in directives:  # a 400 with a code of this number: codes without end
        entry["outcome"] = "rejected"
        return _error(400, "refused", f"code_{directives['code']}")
    fault = next((f for f in FAULTS if f in directives), None)
    if fault is None and fake.fail_rate and fake.random.random() < fake.fail_rate:
        fault = fake.random.choice(FAULTS)
    entry["outcome"] = fault or "ok"
    unbilled = {
        "500": lambda: _error(500, "upstream failure", "internal_error"),
        "429": lambda: _error(
            429, "busy, try later", "rate_limit", "rate_limit_error", {"retry-after": "3"}
        ),
        "quota": lambda: _error(403, "user quota is not enough", "insufficient_user_quota"),
        "moderation": lambda: _error(400, "content blocked", "moderation_blocked"),
        "error200": lambda: _error(200, "generation failed", "generation_failed"),
    }
    if fault in unbilled:
        return unbilled[fault]()
    # Generation starts: billed from here on, whether or not the client stays.
    fake.bill(entry)
    latency = float(directives.get("latency") or fake.latency)
    if fault == "timeout":
        latency = 3600.0
    if latency:
        await asyncio.sleep(latency)
    if fault == "reset":
        await _drop_connection(request)
    size = int(float(directives.get("image-bytes") or fake.image_bytes or 0))
    omit_created = "no-created" in directives or body["model"] == "gpt-image-2-all"
    answer = _answer(fake, body, size, omit_created)
    if "cut" in directives:
        return _cut(request, answer, int(float(directives["cut"] or 0)))
    if "trickle" in directives:
        return _trickle(answer, float(directives["trickle"] or 1))
    return answer


def _trickle(answer: Response, every: float) -> Response:
    """A 200 whose body arrives one byte every ``every`` seconds."""

    async def stream() -> AsyncIterator[bytes]:
        chunks = answer.body_iterator if isinstance(answer, StreamingResponse) else [answer.body]
        async for chunk in _aiter(chunks):
            for byte in bytes(chunk):
                yield bytes((byte,))
                await asyncio.sleep(every)

    return StreamingResponse(stream(), media_type="application/json")


def _cut(request: Request, answer: Response, after: int) -> Response:
    """A 200 whose body breaks off after ``after`` bytes: the connection is dropped."""

    async def stream() -> AsyncIterator[bytes]:
        sent = 0
        chunks = answer.body_iterator if isinstance(answer, StreamingResponse) else [answer.body]
        async for chunk in _aiter(chunks):
            part = bytes(chunk)[: after - sent]
            if part:
                yield part
                sent += len(part)
            if sent >= after:
                break
        await asyncio.sleep(0.05)  # let the bytes leave before the connection dies
        await _drop_connection(request)

    return StreamingResponse(stream(), media_type="application/json")


async def _aiter(chunks: Any) -> AsyncIterator[Any]:
    if hasattr(chunks, "__aiter__"):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


def _answer(fake: FakeUpstream, body: dict[str, Any], size: int, omit_created: bool) -> Response:
    head = b"{" if omit_created else b'{"created":%d,' % int(time.time())
    usage = b',"usage":{"input_tokens":12,"output_tokens":1056,"total_tokens":1068}}'
    if body.get("response_format", "url") == "url":
        url = f"https://fake-upstream.invalid/images/{secrets.token_hex(8)}.png"
        return Response(
            head + b'"data":[{"url":"' + url.encode() + b'"}]' + usage,
            media_type="application/json",
        )
    b64 = fake.b64_png(size)

    async def stream() -> AsyncIterator[bytes]:
        yield head + b'"data":[{"b64_json":"data:image/png;base64,'
        view = memoryview(b64)
        for start in range(0, len(view), CHUNK):
            yield bytes(view[start : start + CHUNK])
        yield b'"}]' + usage

    return StreamingResponse(stream(), media_type="application/json")


async def _drop_connection(request: Request) -> None:
    """Abort the client's connection without an answer, as a crashed gateway would."""
    cycle = getattr(request.receive, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        raise ConnectionResetError("fake upstream reset")
    transport.abort()
    await asyncio.sleep(0.05)  # let the server see the loss; what follows is discarded


def run(
    host: str,
    port: int,
    *,
    latency: float = 0.0,
    fail_rate: float = 0.0,
    api_key: str | None = None,
    image_bytes: int = 0,
    balance_usd: float = 100.0,
    account: bool = True,
) -> None:
    import importlib.util

    import uvicorn

    fake = FakeUpstream(
        api_key=api_key,
        latency=latency,
        fail_rate=fail_rate,
        image_bytes=image_bytes,
        balance_usd=balance_usd,
        account=account,
    )
    uvicorn.run(
        create_fake_app(fake),
        host=host,
        port=port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        access_log=False,
        log_level="warning",
        backlog=8192,
    )
