"""Large bodies stream through with bounded memory (a real proxy process, real sockets)."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import psutil

from proxy.fake_upstream import FakeUpstream, create_fake_app

from .conftest import ADMIN_TOKEN, UPSTREAM_KEY, ProxyProcess, ThreadServer

PNG = b"\x89PNG\r\n\x1a\n"
MB = 1024 * 1024


class PeakRss:
    """Samples a process's resident memory in the background and keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def generate(proxy: ProxyProcess, key: str, image_bytes: int, slow: bool = False) -> bytes:
    body = {"prompt": f"big [fake:image-bytes={image_bytes}]", "response_format": "b64_json"}
    parts = []
    with httpx.stream(
        "POST",
        proxy.url + "/v1/images/generations",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw(64 * 1024):
            parts.append(chunk)
            if slow:
                time.sleep(0.002)
    return b"".join(parts)


def test_20mb_body_streams_with_prefix_stripped_and_flat_memory(
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    fake = FakeUpstream(api_key=UPSTREAM_KEY)
    with ThreadServer(create_fake_app(fake)) as upstream:
        proxy = proxy_process(
            {
                "APIYI_PROXY_UPSTREAM_URL": upstream.url + "/v1",
                "APIYI_API_KEY": UPSTREAM_KEY,
                "APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN,
                "APIYI_PROXY_LOG__LEVEL": "warning",
            }
        )
        key = httpx.post(
            proxy.url + "/admin/keys",
            json={"name": "big"},
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        ).json()["key"]
        # Warm up every code path once so that the baseline includes them.
        generate(proxy, key, 100_000)
        generate(proxy, key, 100_000)
        baseline = psutil.Process(proxy.process.pid).memory_info().rss
        with PeakRss(proxy.process.pid) as small:
            generate(proxy, key, 1_500_000)
        with PeakRss(proxy.process.pid) as big:
            raw = generate(proxy, key, 15_000_000, slow=True)

    assert len(raw) > 20 * 1_000_000
    payload: dict[str, Any] = orjson.loads(raw)
    b64 = payload["data"][0]["b64_json"]
    assert not b64.startswith("data:")
    image = base64.b64decode(b64, validate=True)
    assert image.startswith(PNG) and len(image) >= 15_000_000
    assert payload["created"] > 0
    # A 20 MB body must not show up in the proxy's memory: the peak while streaming
    # it stays within a few MB of the baseline, and of the 2 MB body's peak.
    assert big.peak - baseline < 10 * MB, (baseline, big.peak)
    assert big.peak - small.peak < 5 * MB, (small.peak, big.peak)
