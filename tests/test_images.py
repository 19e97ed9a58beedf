"""The image route's use of the store: two round trips on the request path, hold and settle."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from .conftest import Proxy, RedisServer


def count_commands(proxy: Proxy) -> list[str]:
    """Record every command the proxy sends to Redis (one round trip each), through
    redis-py and through the scripts' own connection."""
    store = proxy.services.ledger.store
    sent: list[str] = []

    def recording(client: Any, method: str) -> None:
        original = getattr(client, method)

        async def call(*args: Any, **options: Any) -> Any:
            sent.append(str(args[0]).lower())
            return await original(*args, **options)

        setattr(client, method, call)

    recording(store.r, "execute_command")
    recording(store._scripts, "execute")
    return sent


def during(sent: list[str], call: Callable[[], object], after_answer: float = 0.3) -> list[str]:
    """The commands sent for ``call``, once the steps after its answer are in."""
    sent.clear()
    call()
    time.sleep(after_answer)
    return sorted(sent)


def test_a_generation_costs_a_hold_and_a_settle(
    fake: Any, start_proxy: Callable[..., Proxy], redis_server: RedisServer
) -> None:
    proxy = start_proxy(
        fake[1].url,
        store={"url": redis_server.url},
        auth={"key_pepper": "pepper-for-tests-0123456789abcdef"},
    )
    key = proxy.new_key()
    headers = {"authorization": f"Bearer {key}"}
    body = {"prompt": "x", "response_format": "url"}

    def plain() -> None:
        response = httpx.post(proxy.url + "/v1/images/generations", json=body, headers=headers)
        assert response.status_code == 200

    plain()  # the key record is read once, then cached
    sent = count_commands(proxy)
    assert during(sent, plain) == ["evalsha", "evalsha"]

    # The SDK's first attempt also claims its fingerprint for a retry to join: in the
    # same step as the hold. Its answer reached its client, so the claim is let go
    # (never joined) once the answer was sent.
    sdk = proxy.sdk(key, max_retries=0)

    def first_attempt() -> None:
        raw = sdk.images.with_raw_response.generate(prompt="y", response_format="url")
        assert raw.http_request.headers["x-stainless-retry-count"] == "0"
        assert raw.parse().data

    assert during(sent, first_attempt) == ["evalsha", "evalsha", "evalsha"]


def test_a_refused_request_costs_no_store_step(
    fake: Any, start_proxy: Callable[..., Proxy], redis_server: RedisServer
) -> None:
    """Refused by the policy, or for its size, a request reserves no money: no hold,
    not a single command to the store, nothing upstream."""
    proxy = start_proxy(
        fake[1].url,
        store={"url": redis_server.url},
        auth={"key_pepper": "pepper-for-tests-0123456789abcdef"},
    )
    key = proxy.new_key()
    headers = {"authorization": f"Bearer {key}"}
    url = proxy.url + "/v1/images/generations"
    assert httpx.post(url, json={"prompt": "x"}, headers=headers).status_code == 200
    time.sleep(0.3)  # the settle of that call is in
    sent = count_commands(proxy)
    billed = fake[0].images_billed

    def refused(body: dict[str, Any], status: int) -> Callable[[], None]:
        def call() -> None:
            response = httpx.post(url, json=body, headers=headers, timeout=10)
            assert response.status_code == status, response.text

        return call

    for body, status in (
        ({"prompt": "x", "mask": "m.png"}, 400),
        ({"prompt": "x", "output_format": "jpeg", "quality": "high"}, 400),
        ({"prompt": "猫" * 32_001}, 400),
        ({"prompt": "x", "pad": "y" * 400_384}, 413),
    ):
        assert during(sent, refused(body, status)) == [], body
    assert fake[0].images_billed == billed
