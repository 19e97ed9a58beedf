"""Paths where money could go wrong, through real processes, a real Redis and the fake
upstream's billing log. Every test ends by comparing the ledger with what was billed."""

from __future__ import annotations

import datetime
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from .conftest import ProxyProcess, RedisServer, ThreadServer, billing
from .test_forward import wait_for
from .test_replicas import create_key, replica_env, usage

GENERATIONS = "/v1/images/generations"


def in_background(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(call())
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


# item: an SDK retry never replays another call's picture ----------------------------


def test_sdk_retry_never_replays_a_delivered_picture(
    redis_server: RedisServer, upstream: ThreadServer, proxy_process: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_process(replica_env(redis_server.url, upstream))
    key, _ = create_key(proxy, concurrency=1)
    prompt = "the same picture, asked for three times"
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=2) as sdk:
        first = sdk.images.with_raw_response.generate(prompt=prompt, response_format="url")
        second = sdk.images.with_raw_response.generate(prompt=prompt, response_format="url")
        # A slow call of the same key holds its one slot: the third identical call's
        # first attempt is refused (429, retry-after 1 s) and the SDK retries it.
        slow, _ = in_background(
            lambda: httpx.post(
                proxy.url + GENERATIONS,
                json={"prompt": "[fake:latency=0.8] another", "response_format": "url"},
                headers={"authorization": f"Bearer {key}"},
                timeout=30,
            )
        )
        wait_for(lambda: len(billing(upstream)["requests"]) >= 3)  # the slow call holds its slot
        third = sdk.images.with_raw_response.generate(prompt=prompt, response_format="url")
        slow.join(30)
    assert third.retries_taken >= 1
    urls = [r.parse().data[0].url for r in (first, second, third)]
    assert len(set(urls)) == 3, "a retry was answered with another call's picture"
    assert all(r.headers.get("x-proxy-replay") is None for r in (first, second, third))
    assert billing(upstream)["images_billed"] == 4
    assert usage(proxy, key)["spent_usd"] == pytest.approx(0.03 * 4)


def test_sdk_retry_of_a_lost_answer_replays_it_once(
    redis_server: RedisServer, upstream: ThreadServer, proxy_process: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_process(replica_env(redis_server.url, upstream))
    key, _ = create_key(proxy)
    prompt = "[fake:latency=2] one picture, asked for once"
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, timeout=1.0, max_retries=2) as sdk:
        joined = sdk.images.with_raw_response.generate(prompt=prompt, response_format="url")
    assert joined.headers.get("x-proxy-replay") == "sdk_retry"
    assert billing(upstream)["images_billed"] == 1
    # That answer reached its client: the same body retried later is a new call.
    later = httpx.post(
        proxy.url + GENERATIONS,
        json={"prompt": prompt, "response_format": "url"},
        headers={"authorization": f"Bearer {key}", "x-stainless-retry-count": "1"},
        timeout=30,
    )
    assert later.status_code == 200
    assert later.headers.get("x-proxy-replay") is None
    assert later.json()["data"][0]["url"] != joined.parse().data[0].url
    assert billing(upstream)["images_billed"] == 2
    assert usage(proxy, key)["spent_usd"] == pytest.approx(0.06)


# item: no call outlives its hold ------------------------------------------------------


def test_trickling_upstream_cannot_outlive_the_hold(
    redis_server: RedisServer, upstream: ThreadServer, proxy_process: Callable[..., ProxyProcess]
) -> None:
    # One byte every 0.3 s keeps every read alive; the total deadline ends the call.
    # The lease is 1 s: without renewal the hold would lapse long before.
    env = replica_env(
        redis_server.url,
        upstream,
        APIYI_PROXY_UPSTREAM__TOTAL_TIMEOUT_SECONDS="4",
        APIYI_PROXY_UPSTREAM__READ_TIMEOUT="60",
        APIYI_PROXY_LEDGER__LEASE_SECONDS="1",
    )
    proxy = proxy_process(env)
    key, _ = create_key(proxy, concurrency=1)
    headers = {"authorization": f"Bearer {key}", "idempotency-key": "trickle-1"}
    body = {"prompt": "[fake:trickle=0.3] slowly", "response_format": "url"}
    started = time.monotonic()
    trickling, answer = in_background(
        lambda: httpx.post(proxy.url + GENERATIONS, json=body, headers=headers, timeout=60)
    )
    time.sleep(2.5)  # well past a lease
    other = httpx.post(
        proxy.url + GENERATIONS,
        json={"prompt": "x", "response_format": "url"},
        headers={"authorization": f"Bearer {key}"},
    )
    assert other.status_code == 429  # the slot is still held: one call at a time
    duplicate = httpx.post(proxy.url + GENERATIONS, json=body, headers=headers, timeout=60)
    trickling.join(60)
    elapsed = time.monotonic() - started
    assert 4 <= elapsed < 10, elapsed
    response = answer[0]
    assert isinstance(response, httpx.Response)
    assert response.status_code == 504, response.text  # did not finish in time
    # The duplicate waited for the call instead of making its own.
    assert duplicate.status_code == 409, duplicate.text
    assert billing(upstream)["images_billed"] == 1
    today = usage(proxy, key)
    assert today["held_usd"] == 0
    assert today["spent_usd"] == pytest.approx(0.03)


# item: a store restarted empty does not forget what was billed --------------------------


def test_store_restarted_empty_still_books_what_was_billed(
    upstream: ThreadServer, proxy_process: Callable[..., ProxyProcess]
) -> None:
    server = RedisServer()
    try:
        env = replica_env(server.url, upstream, APIYI_PROXY_STORE__TIMEOUT_SECONDS="2")
        env["APIYI_PROXY_LOG__LEVEL"] = "info"
        proxy = proxy_process(env)
        key, key_id = create_key(proxy)
        calls = [
            in_background(
                lambda: httpx.post(
                    proxy.url + GENERATIONS,
                    json={"prompt": "[fake:latency=2] x", "response_format": "url"},
                    headers={"authorization": f"Bearer {key}"},
                    timeout=30,
                )
            )
            for _ in range(15)
        ]
        wait_for(lambda: billing(upstream)["images_billed"] >= 15)
        # Redis dies with every hold in it and comes back empty on the same port.
        server.process.kill()
        server.process.wait(10)
        server = RedisServer(port=server.port)
        for thread, _ in calls:
            thread.join(30)
        assert all(r[0].status_code == 200 for _, r in calls)
        day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
        client = redis.Redis(port=server.port, decode_responses=True)
        usage_key = f"apiyi:{{k:{key_id}}}:u:key:{key_id}:{day}"
        wait_for(lambda: int(client.hget(usage_key, "spent") or 0) >= 450_000)
        booked = client.hgetall(usage_key)
        client.close()
        assert billing(upstream)["images_billed"] == 15
        assert int(booked["spent"]) == 15 * 30_000  # the ledger equals what was billed
        metrics = httpx.get(proxy.url + "/metrics").text
        found = re.search(r"^apiyi_proxy_settles_without_hold_total (\S+)$", metrics, re.M)
        assert found and float(found.group(1)) == 15
        assert proxy.output().count("settle found no hold") == 15
    finally:
        server.stop()


# item: dedupe across replicas by default ------------------------------------------------


def test_sdk_retry_on_another_replica_replays_instead_of_paying_again(
    redis_server: RedisServer, upstream: ThreadServer, proxy_process: Callable[..., ProxyProcess]
) -> None:
    # No results_url: replay bodies live beside the shared ledger.
    a, b = (proxy_process(replica_env(redis_server.url, upstream)) for _ in range(2))
    key, _ = create_key(a)
    body = {"prompt": "[fake:latency=1.5] one picture", "response_format": "url"}
    headers = {"authorization": f"Bearer {key}"}
    # The first attempt's client gives up before the answer (as the SDK does on its
    # timeout) and the retry reaches the other replica once the first has finished.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            a.url + GENERATIONS,
            json=body,
            headers={**headers, "x-stainless-retry-count": "0"},
            timeout=0.5,
        )
    wait_for(lambda: usage(a, key)["held_usd"] == 0)
    retry = httpx.post(
        b.url + GENERATIONS,
        json=body,
        headers={**headers, "x-stainless-retry-count": "1"},
        timeout=30,
    )
    assert retry.status_code == 200, retry.text
    assert retry.headers["x-proxy-replay"] == "sdk_retry"
    assert billing(upstream)["images_billed"] == 1
    assert usage(b, key)["spent_usd"] == pytest.approx(0.03)


def test_a_client_that_reads_slowly_cannot_outlive_the_hold(
    redis_server: RedisServer, upstream: ThreadServer, proxy_process: Callable[..., ProxyProcess]
) -> None:
    # The deadline covers the answer's way to the client too: a 20 MB image to a client
    # that stops reading must not keep the call (and so its slot) past it.
    env = replica_env(
        redis_server.url,
        upstream,
        APIYI_PROXY_UPSTREAM__TOTAL_TIMEOUT_SECONDS="3",
        APIYI_PROXY_LEDGER__LEASE_SECONDS="1",
    )
    proxy = proxy_process(env)
    key, _ = create_key(proxy, concurrency=1)
    body = orjson.dumps(
        {"prompt": "[fake:image-bytes=15000000] big", "response_format": "b64_json"}
    )
    request = (
        f"POST {GENERATIONS} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", proxy.port))
        slow.sendall(request)
        started = time.monotonic()
        slow.settimeout(10)
        assert slow.recv(4096).startswith(b"HTTP/1.1 200")  # and then it stops reading
        probes = []
        while time.monotonic() - started < 8:
            probe = httpx.post(
                proxy.url + GENERATIONS,
                json={"prompt": "x", "response_format": "url"},
                headers={"authorization": f"Bearer {key}"},
            )
            probes.append((round(time.monotonic() - started, 1), probe.status_code))
            if probe.status_code == 200:
                break
            assert probe.status_code == 429, probe.text
            time.sleep(0.5)
    # Refused while the slow call lived, and free again once its deadline passed.
    assert probes[-1][1] == 200, probes
    assert all(status == 429 for _, status in probes[:-1]), probes
    assert 3 <= probes[-1][0] < 6, probes
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'apiyi_proxy_holds_resolved_total{outcome="expired"} 0.0' in metrics
    assert billing(upstream)["images_billed"] == 2
    today = usage(proxy, key)
    assert today["held_usd"] == 0
    assert today["spent_usd"] == pytest.approx(0.06)  # both images were made and billed
