"""What happens to money and answers when the upstream call fails, over real sockets.

The rule under test (SPEC section 7): a hold is released only when the upstream
certainly did not bill (unreachable, a 4xx/5xx answer, a 200 carrying an error); it
is kept as spent, and marked uncertain, when the call may have been billed but the
proxy cannot know (timeouts, lost connections).
"""

from __future__ import annotations

import base64
import random
import re
import socket
import string
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import httpx
import openai
import orjson
import pytest
import redis
from starlette.types import Receive, Scope, Send

from proxy.fake_upstream import FakeUpstream, create_fake_app

from .conftest import (
    UPSTREAM_KEY,
    Proxy,
    RedisServer,
    ThreadServer,
    billing,
    free_port,
)

PNG = b"\x89PNG\r\n\x1a\n"
PRICE = 0.03
GENERATIONS = "/v1/images/generations"
Fake = tuple[FakeUpstream, ThreadServer]


def sdk(proxy: Proxy, key: str, **kwargs: Any) -> openai.OpenAI:
    kwargs.setdefault("max_retries", 0)
    return proxy.sdk(key, **kwargs)


def generate(
    proxy: Proxy,
    key: str,
    prompt: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> httpx.Response:
    return httpx.post(
        proxy.url + GENERATIONS,
        json={"prompt": prompt, "response_format": "url"},
        headers={"authorization": f"Bearer {key}", **(headers or {})},
        timeout=timeout,
    )


def generate_ok(proxy: Proxy, key: str, prompt: str) -> httpx.Response:
    response = generate(proxy, key, prompt)
    assert response.status_code == 200, response.text
    return response


def usage(proxy: Proxy, key: str) -> dict[str, Any]:
    """The key's tallies for today, from ``GET /v1/usage``."""
    response = httpx.get(
        proxy.url + "/v1/usage", headers={"authorization": f"Bearer {key}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    today: dict[str, Any] = response.json()["today"]
    return today


def assert_money(proxy: Proxy, key: str, *, spent: float, uncertain: float = 0.0) -> dict[str, Any]:
    today = usage(proxy, key)
    assert today["held_usd"] == 0
    assert today["spent_usd"] == pytest.approx(spent)
    assert today["uncertain_usd"] == pytest.approx(uncertain)
    return today


class Answer(Protocol):
    """An HTTP response, from httpx or from the SDK's own HTTP client."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    def json(self, **kwargs: Any) -> Any: ...


def assert_error(response: Answer, status: int, type_: str, code: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    assert error["code"] == code
    assert error["message"]
    assert UPSTREAM_KEY not in response.text


def wait_for(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# timeouts, resets, unreachable -------------------------------------------------------


def test_upstream_timeout_is_504_and_kept_as_uncertain(
    fake: Fake, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(fake[1].url, upstream={"read_timeout": 1})
    key = proxy.new_key()
    # Default SDK retries: x-should-retry: false must stop them, or one call pays thrice.
    client = sdk(proxy, key, max_retries=2)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        client.images.generate(prompt="[fake:latency=5] slow")
    assert time.monotonic() - started < 10
    response = info.value.response
    assert_error(response, 504, "upstream_timeout", "upstream_timeout")
    assert response.headers["x-should-retry"] == "false"
    assert billing(fake[1])["images_billed"] == 1
    assert len(billing(fake[1])["requests"]) == 1
    assert_money(proxy, key, spent=PRICE, uncertain=PRICE)


def test_upstream_reset_is_502_and_kept_as_uncertain(proxy: Proxy, fake: Fake) -> None:
    key = proxy.new_key()
    response = generate(proxy, key, "[fake:reset] dropped")
    assert_error(response, 502, "upstream_error", "upstream_connection_lost")
    assert response.headers["x-should-retry"] == "false"
    assert billing(fake[1])["images_billed"] == 1
    assert_money(proxy, key, spent=PRICE, uncertain=PRICE)


def test_small_answer_leaves_whole_with_its_length(proxy: Proxy) -> None:
    response = generate_ok(proxy, proxy.new_key(), "a small answer")
    assert response.headers["content-length"] == str(len(response.content))
    assert "transfer-encoding" not in response.headers
    assert response.json()["data"][0]["url"].startswith("https://")


def b64_request(proxy: Proxy, key: str, prompt: str) -> httpx.Response:
    return httpx.post(
        proxy.url + GENERATIONS,
        json={"prompt": prompt, "response_format": "b64_json"},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def test_answer_broken_off_early_is_502_and_spent(proxy: Proxy, fake: Fake) -> None:
    # The 200 came and the image began, so it was made and billed; nothing had reached
    # the client yet, so it gets an error rather than a cut-off body.
    key = proxy.new_key()
    response = b64_request(proxy, key, "[fake:image-bytes=300000] [fake:cut=2000] x")
    assert_error(response, 502, "upstream_error", "upstream_connection_lost")
    assert billing(fake[1])["images_billed"] == 1
    assert_money(proxy, key, spent=PRICE)


def test_answer_broken_off_late_cuts_the_stream_and_is_spent(proxy: Proxy, fake: Fake) -> None:
    key = proxy.new_key()
    with pytest.raises(httpx.RemoteProtocolError):
        b64_request(proxy, key, "[fake:image-bytes=3000000] [fake:cut=1000000] x")
    assert billing(fake[1])["images_billed"] == 1
    wait_for(lambda: usage(proxy, key)["held_usd"] == 0)
    assert_money(proxy, key, spent=PRICE)


def test_unreachable_upstream_is_502_and_released(start_proxy: Callable[..., Proxy]) -> None:
    closed = free_port()  # nothing listens here: the connection is refused
    proxy = start_proxy(f"http://127.0.0.1:{closed}")
    key = proxy.new_key(daily_usd=PRICE)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as info:
            sdk(proxy, key).images.generate(prompt="nobody home")
        response = info.value.response
        assert_error(response, 502, "upstream_error", "upstream_unreachable")
        # Nothing was sent, so nothing was billed: a retry cannot pay twice.
        assert response.headers["x-should-retry"] == "true"
        assert str(closed) not in response.text
    today = assert_money(proxy, key, spent=0)
    assert today["remaining_usd"] == pytest.approx(PRICE)
    assert today["requests"] == 2


# upstream error answers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("directive", "status", "type_", "code", "should_retry"),
    [
        ("moderation", 400, "invalid_request_error", "moderation_blocked", "false"),
        ("500", 502, "upstream_error", "upstream_error", "true"),
        ("error200", 502, "upstream_error", "upstream_error", "false"),
        ("quota", 502, "upstream_error", "upstream_quota_exhausted", "false"),
        ("429", 429, "rate_limit_error", "rate_limit_exceeded", "true"),
    ],
)
def test_upstream_error_answer_is_mapped_and_released(
    directive: str,
    status: int,
    type_: str,
    code: str,
    should_retry: str,
    proxy: Proxy,
    fake: Fake,
) -> None:
    key = proxy.new_key(daily_usd=PRICE)
    response = generate(proxy, key, f"[fake:{directive}] x")
    assert_error(response, status, type_, code)
    assert response.headers["x-should-retry"] == should_retry
    if status == 429:
        assert response.headers["retry-after"] == "3"
    else:
        assert "retry-after" not in response.headers
    assert len(billing(fake[1])["requests"]) == 1
    assert billing(fake[1])["images_billed"] == 0
    today = assert_money(proxy, key, spent=0)
    assert today["remaining_usd"] == pytest.approx(PRICE)
    # The released budget buys the next image.
    generate_ok(proxy, key, "fine")
    assert_money(proxy, key, spent=PRICE)


# client disconnects --------------------------------------------------------------------


def _leave_by_timeout(proxy: Proxy, key: str, fake: Fake) -> None:
    with pytest.raises(httpx.ReadTimeout):
        generate(proxy, key, "[fake:latency=2] slow", timeout=0.5)


def _leave_by_closing(proxy: Proxy, key: str, fake: Fake) -> None:
    body = orjson.dumps({"prompt": "[fake:latency=2] slow", "response_format": "url"})
    head = (
        f"POST {GENERATIONS} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", proxy.server.port), timeout=5) as conn:
        conn.sendall(head.encode() + body)
        # Close only once the call is upstream, so it is the answer that finds no one.
        wait_for(lambda: bool(billing(fake[1])["requests"]))


@pytest.mark.parametrize("leave", [_leave_by_timeout, _leave_by_closing], ids=["timeout", "close"])
def test_client_gone_mid_call_keeps_money_and_frees_the_slot(
    leave: Callable[[Proxy, str, Fake], None], proxy: Proxy, fake: Fake
) -> None:
    key = proxy.new_key(concurrency=1)
    leave(proxy, key, fake)
    # The proxy still waits for the upstream: the key's one slot is taken meanwhile.
    busy = generate(proxy, key, "second")
    assert_error(busy, 429, "rate_limit_error", "rate_limit_exceeded")
    assert int(busy.headers["retry-after"]) >= 1
    in_flight = usage(proxy, key)
    assert in_flight["held_usd"] == pytest.approx(PRICE)

    wait_for(lambda: usage(proxy, key)["held_usd"] == 0)
    # The upstream answered 200, so the image was made and billed for certain: spent,
    # not uncertain, even though nobody was there to receive it.
    assert billing(fake[1])["images_billed"] == 1
    assert_money(proxy, key, spent=PRICE, uncertain=0)
    generate_ok(proxy, key, "next")
    assert_money(proxy, key, spent=2 * PRICE)


# n policies ----------------------------------------------------------------------------


def _images(result: openai.types.ImagesResponse) -> list[bytes]:
    assert result.data is not None
    return [base64.b64decode(item.b64_json or "", validate=True) for item in result.data]


def test_fanout_makes_n_parallel_calls(fake: Fake, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(fake[1].url, policy={"n": "fanout"})
    key = proxy.new_key()
    started = time.monotonic()
    raw = sdk(proxy, key).images.with_raw_response.generate(
        prompt="[fake:latency=1] three cats", n=3
    )
    elapsed = time.monotonic() - started
    result = raw.parse()
    images = _images(result)
    assert len(images) == 3
    assert all(image.startswith(PNG) for image in images)
    assert result.created > 0
    adjusted = raw.headers["x-proxy-adjusted"]
    assert "dropped=n" in adjusted and "images=" not in adjusted
    sent = billing(fake[1])
    assert sent["images_billed"] == 3
    assert [r["n"] for r in sent["requests"]] == [None, None, None]
    today = assert_money(proxy, key, spent=3 * PRICE)
    assert today["requests"] == 1
    # In parallel: three one-second calls took well under three seconds.
    assert elapsed < 2.8


@pytest.mark.parametrize(
    ("seed", "outcomes", "spent", "uncertain"),
    [
        # Seeds of the fake's fail_rate draws giving exactly one failure among three.
        (40, ["500", "ok", "ok"], 2 * PRICE, 0.0),
        (2, ["ok", "ok", "timeout"], 3 * PRICE, PRICE),
    ],
    ids=["500", "timeout"],
)
def test_fanout_with_one_failed_call_returns_fewer_images(
    seed: int,
    outcomes: list[str],
    spent: float,
    uncertain: float,
    start_proxy: Callable[..., Proxy],
) -> None:
    state = FakeUpstream(api_key=UPSTREAM_KEY, fail_rate=0.3, seed=seed)
    with ThreadServer(create_fake_app(state)) as server:
        proxy = start_proxy(server.url, policy={"n": "fanout"}, upstream={"read_timeout": 1})
        key = proxy.new_key()
        raw = sdk(proxy, key).images.with_raw_response.generate(prompt="three dogs", n=3)
        assert sorted(r["outcome"] for r in billing(server)["requests"]) == outcomes
        images = _images(raw.parse())
        assert len(images) == 2
        assert all(image.startswith(PNG) for image in images)
        assert "images=2/3" in raw.headers["x-proxy-adjusted"]
        assert billing(server)["images_billed"] == round(spent / PRICE)
        assert_money(proxy, key, spent=spent, uncertain=uncertain)


def test_fanout_with_every_call_failed_is_released(
    fake: Fake, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(fake[1].url, policy={"n": "fanout"})
    key = proxy.new_key()
    with pytest.raises(openai.InternalServerError) as info:
        sdk(proxy, key).images.generate(prompt="[fake:500] three", n=3)
    assert info.value.status_code == 502
    assert len(billing(fake[1])["requests"]) == 3
    assert_money(proxy, key, spent=0)


def test_fanout_whose_answers_are_errors_in_200_is_released(
    fake: Fake, start_proxy: Callable[..., Proxy]
) -> None:
    # Each call's error object must reach the outcome: a 200 carrying one billed nothing.
    proxy = start_proxy(fake[1].url, policy={"n": "fanout"})
    key = proxy.new_key()
    httpx.post(
        proxy.url + GENERATIONS,
        json={"prompt": "[fake:error200] three", "n": 3},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert len(billing(fake[1])["requests"]) == 3
    assert billing(fake[1])["images_billed"] == 0
    assert_money(proxy, key, spent=0)


def test_strip_sends_one_call_and_bills_once(fake: Fake, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(fake[1].url, policy={"n": "strip"})
    key = proxy.new_key()
    raw = sdk(proxy, key).images.with_raw_response.generate(prompt="three birds", n=3)
    images = _images(raw.parse())
    assert len(images) == 1 and images[0].startswith(PNG)
    adjusted = raw.headers["x-proxy-adjusted"]
    assert "n=1" in adjusted and "dropped=n" in adjusted
    sent = billing(fake[1])
    assert sent["images_billed"] == 1
    assert [r["n"] for r in sent["requests"]] == [None]
    assert_money(proxy, key, spent=PRICE)


# passthrough ---------------------------------------------------------------------------

# Shaped like upstream keys (the proxy refuses anything else in passthrough mode), but
# put together here so that no literal in the source looks like a leaked key.
CLIENT_KEY = "sk-" + "ClientOwnUpstreamKeyForTests" + "0123456789"
WRONG_KEY = "sk-" + "SomeoneElsesUpstreamKeyForTests" + "0123456789"


class HeaderLog:
    """Wraps the fake upstream's app and keeps every request's headers."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[dict[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.requests.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await self.app(scope, receive, send)


@pytest.fixture
def logged_fake() -> Iterator[tuple[FakeUpstream, HeaderLog, ThreadServer]]:
    state = FakeUpstream(api_key=CLIENT_KEY)
    log = HeaderLog(create_fake_app(state))
    with ThreadServer(log) as server:
        yield state, log, server


def test_passthrough_forwards_the_client_key_and_meters_it(
    logged_fake: tuple[FakeUpstream, HeaderLog, ThreadServer],
    start_proxy: Callable[..., Proxy],
) -> None:
    _, log, server = logged_fake
    proxy = start_proxy(server.url, auth={"mode": "passthrough"})
    result = sdk(proxy, CLIENT_KEY).images.generate(prompt="mine")
    assert _images(result)[0].startswith(PNG)
    assert [r["authorization"] for r in log.requests] == [f"Bearer {CLIENT_KEY}"]

    wrong = WRONG_KEY
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(proxy, wrong).images.generate(prompt="theirs")
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert [r["authorization"] for r in log.requests] == [
        f"Bearer {CLIENT_KEY}",
        f"Bearer {wrong}",
    ]
    # The proxy's own upstream key never left it.
    assert not any(UPSTREAM_KEY in value for r in log.requests for value in r.values())
    assert billing(server)["images_billed"] == 1

    # Each client key is metered on its own, under an id made from its HMAC; the key
    # the upstream refused left no record.
    mine = httpx.get(proxy.url + "/v1/usage", headers={"authorization": f"Bearer {CLIENT_KEY}"})
    hasher = proxy.services.hasher
    assert mine.json()["key"]["id"] == "pt_" + hasher.hash(CLIENT_KEY)[:16]
    assert CLIENT_KEY not in mine.text
    assert mine.json()["today"]["spent_usd"] == pytest.approx(PRICE)
    listed = proxy.admin("GET", "/admin/keys").json()["data"]
    assert [k["id"] for k in listed] == [mine.json()["key"]["id"]]


NOT_KEYS = {
    "too short": "sk-" + "a1" * 15 + "b",
    "too long": "sk-" + "a1" * 32 + "b",
    "no prefix": "Ab1" * 14,
    "other prefix": "pk-" + "Ab1" * 14,
    "upper-case prefix": "SK-" + "Ab1" * 14,
    "underscore": "sk_" + "Ab1" * 14,
    "dash inside": "sk-" + "Ab1" * 7 + "-" + "Ab1" * 7,
    "proxy key alphabet": "sk-" + "Ab_1" * 10,
    "Unicode digits": "sk-" + "\uff11" * 40,
    "Unicode letters": "sk-" + "\u00e9" * 40,
}


@pytest.mark.parametrize("shape", sorted(NOT_KEYS))
def test_passthrough_refuses_what_is_not_shaped_like_an_upstream_key(
    logged_fake: tuple[FakeUpstream, HeaderLog, ThreadServer],
    start_proxy: Callable[..., Proxy],
    shape: str,
) -> None:
    _, log, server = logged_fake
    proxy = start_proxy(server.url, auth={"mode": "passthrough"})
    token = NOT_KEYS[shape]
    response = httpx.post(
        proxy.url + GENERATIONS,
        json={"prompt": "x", "response_format": "url"},
        headers={"authorization": b"Bearer " + token.encode("utf-8")},
    )
    assert response.status_code == 401
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert log.requests == []
    assert proxy.admin("GET", "/admin/keys").json()["data"] == []


def random_tokens(count: int) -> list[str]:
    """Bearer tokens of every shape, about a third of them shaped like upstream keys."""
    rng = random.Random(7)
    alnum = string.ascii_letters + string.digits

    def text(alphabet: str, low: int, high: int) -> str:
        return "".join(rng.choices(alphabet, k=rng.randint(low, high)))

    makers = [
        lambda: "sk-" + text(alnum, 32, 64),  # key-shaped: the upstream decides
        lambda: "sk-" + text(alnum, 1, 31),
        lambda: "sk-" + text(alnum, 65, 120),
        lambda: "sk-" + text(alnum + "-_", 43, 43),  # a proxy key's alphabet
        lambda: text(alnum + "-_.~+/=", 1, 100),
        lambda: rng.choice(["SK-", "sk_", "pk-", "Bearer-", ""]) + text(alnum, 32, 64),
    ]
    return [makers[i % len(makers)]() for i in range(count)]


def test_passthrough_random_tokens_leave_no_store_state(
    logged_fake: tuple[FakeUpstream, HeaderLog, ThreadServer],
    start_proxy: Callable[..., Proxy],
    redis_server: RedisServer,
) -> None:
    """Made-up tokens cost no upstream call unless shaped like a key, and leave no
    ledger state either way; a real key is still forwarded and metered."""
    _, log, server = logged_fake
    proxy = start_proxy(server.url, store={"url": redis_server.url}, auth={"mode": "passthrough"})
    db = redis.Redis.from_url(redis_server.url)
    before = db.dbsize()

    tokens = random_tokens(300)
    shaped = [t for t in tokens if re.fullmatch(r"sk-[A-Za-z0-9]{32,64}", t)]
    assert 50 <= len(shaped) < len(tokens) - 100
    with httpx.Client(timeout=30) as client:
        for i, token in enumerate(tokens):
            # Some as an SDK's first attempt, which also claims an idempotency scope.
            retry = {"x-stainless-retry-count": "0"} if i % 3 == 0 else {}
            response = client.post(
                proxy.url + GENERATIONS,
                json={"prompt": "x", "response_format": "url"},
                headers={"authorization": f"Bearer {token}", **retry},
            )
            assert response.status_code == 401, response.text
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")

    # Only the key-shaped ones reached the upstream, each once; nothing was billed.
    assert sorted(r["authorization"] for r in log.requests) == sorted(f"Bearer {t}" for t in shaped)
    assert billing(server) == {"images_billed": 0, "requests": []}
    # Reading its usage does not make a key-shaped token a record either.
    for token in shaped[:20]:
        usage = httpx.get(proxy.url + "/v1/usage", headers={"authorization": f"Bearer {token}"})
        assert usage.json()["today"]["requests"] == 0
    assert db.dbsize() == before
    assert proxy.admin("GET", "/admin/keys").json()["data"] == []

    # A real key still works, and is metered under its own record.
    result = sdk(proxy, CLIENT_KEY).images.generate(prompt="mine", response_format="url")
    assert result.data and result.data[0].url
    assert billing(server)["images_billed"] == 1
    usage = httpx.get(proxy.url + "/v1/usage", headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert usage.json()["key"]["id"] == "pt_" + proxy.services.hasher.hash(CLIENT_KEY)[:16]
    assert usage.json()["today"]["spent_usd"] == pytest.approx(PRICE)
    assert db.dbsize() > before
    db.close()


def test_passthrough_key_refused_by_the_policy_leaves_no_store_state(
    logged_fake: tuple[FakeUpstream, HeaderLog, ThreadServer],
    start_proxy: Callable[..., Proxy],
    redis_server: RedisServer,
) -> None:
    """A made-up but key-shaped token with a request the proxy itself refuses reaches
    neither the upstream nor the store: a record is made only for a call about to pay."""
    _, log, server = logged_fake
    proxy = start_proxy(server.url, store={"url": redis_server.url}, auth={"mode": "passthrough"})
    db = redis.Redis.from_url(redis_server.url)
    before = db.dbsize()
    refused = [
        {"prompt": "x", "size": "7x7"},
        {"prompt": "x", "model": "no-such-model"},
        {"prompt": "x", "n": 2},
        {"size": "1280x1280"},
        {"prompt": "x", "quality": "hd", "stream": True},
    ]
    with httpx.Client(timeout=30) as client:
        for i, token in enumerate(random_tokens(200)):
            if not re.fullmatch(r"sk-[A-Za-z0-9]{32,64}", token):
                continue
            response = client.post(
                proxy.url + GENERATIONS,
                json=refused[i % len(refused)],
                headers={"authorization": f"Bearer {token}"},
            )
            assert response.status_code == 400, response.text
    assert log.requests == []
    assert billing(server) == {"images_billed": 0, "requests": []}
    assert db.dbsize() == before
    db.close()


# store down ----------------------------------------------------------------------------


def _redis_proxy(
    start_proxy: Callable[..., Proxy], upstream: str, redis: RedisServer, on_error: str
) -> Proxy:
    return start_proxy(
        upstream,
        store={"url": redis.url, "on_error": on_error},
        # The key record stays cached, so only the budget step meets the dead store.
        auth={"key_pepper": "pepper-for-tests-0123456789abcdef", "key_cache_seconds": 60},
    )


def test_store_down_fails_closed_by_default(
    fake: Fake, redis_server: RedisServer, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = _redis_proxy(start_proxy, fake[1].url, redis_server, "closed")
    key = proxy.new_key()
    generate_ok(proxy, key, "warm")
    redis_server.stop()
    started = time.monotonic()
    response = generate(proxy, key, "refused")
    assert time.monotonic() - started < 3
    assert_error(response, 503, "service_unavailable", "store_unavailable")
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-should-retry"] == "true"
    assert len(billing(fake[1])["requests"]) == 1  # the upstream was not called


def test_store_down_with_on_error_open_lets_calls_through(
    fake: Fake, redis_server: RedisServer, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = _redis_proxy(start_proxy, fake[1].url, redis_server, "open")
    key = proxy.new_key()
    generate_ok(proxy, key, "warm")
    redis_server.stop()
    # Past the second a cached record is trusted without a subscription to key changes:
    # the record last read still lets the call through.
    time.sleep(1.2)
    response = generate(proxy, key, "through anyway")
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["url"].startswith("https://")
    assert billing(fake[1])["images_billed"] == 2


def test_readyz_follows_the_store(
    fake: Fake, redis_server: RedisServer, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = _redis_proxy(start_proxy, fake[1].url, redis_server, "closed")
    ready = httpx.get(proxy.url + "/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}

    redis_server.stop()
    down = httpx.get(proxy.url + "/readyz")
    assert_error(down, 503, "service_unavailable", "store_unavailable")
    assert int(down.headers["retry-after"]) >= 1
    assert httpx.get(proxy.url + "/healthz").status_code == 200  # alive, just not ready

    back = RedisServer(port=redis_server.port)
    try:
        wait_for(lambda: httpx.get(proxy.url + "/readyz").status_code == 200)
    finally:
        back.stop()


# request ids ---------------------------------------------------------------------------

GENERATED_ID = re.compile(r"^req_[0-9a-f]{24}$")


def test_every_response_has_a_request_id(proxy: Proxy) -> None:
    key = proxy.new_key()
    auth = {"authorization": f"Bearer {key}"}
    responses = [
        httpx.get(proxy.url + "/healthz"),
        httpx.get(proxy.url + "/readyz"),
        httpx.get(proxy.url + "/metrics"),
        httpx.get(proxy.url + "/v1/models", headers=auth),
        httpx.get(proxy.url + "/v1/usage", headers=auth),
        httpx.get(proxy.url + "/no/such/route"),
        httpx.post(proxy.url + GENERATIONS, json={"prompt": "x"}),
        httpx.post(proxy.url + GENERATIONS, content=b"not json", headers=auth),
        generate(proxy, key, "fine"),
        generate(proxy, key, "[fake:500] broken"),
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 200, 404, 401, 400, 200, 502]
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(GENERATED_ID.match(i) for i in ids), ids
    assert len(set(ids)) == len(ids)


def test_the_proxys_request_id_stays_authoritative_beside_the_clients(proxy: Proxy) -> None:
    """A client's x-request-id comes back as x-client-request-id; the proxy's own id,
    unique per request, is x-request-id even when two clients choose the same one."""
    key = proxy.new_key()
    ids = set()
    for prompt, status in (("fine", 200), ("[fake:moderation] x", 400), ("fine", 200)):
        response = generate(proxy, key, prompt, headers={"x-request-id": "trace-42.a:b_c"})
        assert response.status_code == status
        assert GENERATED_ID.match(response.headers["x-request-id"])
        assert response.headers["x-client-request-id"] == "trace-42.a:b_c"
        ids.add(response.headers["x-request-id"])
    assert len(ids) == 3
    for bad in ("has spaces in it", "x" * 65, "semi;colon", "<script>"):
        response = httpx.get(proxy.url + "/healthz", headers={"x-request-id": bad})
        assert GENERATED_ID.match(response.headers["x-request-id"])
        assert "x-client-request-id" not in response.headers


def test_an_idempotency_key_too_long_is_a_400_that_says_so(proxy: Proxy, fake: Fake) -> None:
    key = proxy.new_key(daily_usd=PRICE)
    for length, status in ((256, 400), (1000, 400), (255, 200)):
        response = generate(proxy, key, "fine", headers={"idempotency-key": "k" * length})
        if status == 400:
            assert_error(response, 400, "invalid_request_error", "invalid_idempotency_key")
            assert response.json()["error"]["param"] == "Idempotency-Key"
            assert response.headers["x-should-retry"] == "false"
        else:
            assert response.status_code == 200, response.text
    # Neither refusal reached the upstream or held money.
    assert len(billing(fake[1])["requests"]) == 1
    assert_money(proxy, key, spent=PRICE)
