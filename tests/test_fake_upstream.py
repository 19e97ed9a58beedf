"""The fake upstream follows the provider's rules of SPEC section 2, over real sockets."""

from __future__ import annotations

import base64
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from proxy.fake_upstream import VIP_SIZES, FakeUpstream, check_generation, create_fake_app

from .conftest import ROOT, UPSTREAM_KEY, ThreadServer, billing, free_port

Fake = tuple[FakeUpstream, ThreadServer]
PNG = b"\x89PNG\r\n\x1a\n"
PREFIX = "data:image/png;base64,"
SPEC_VIP_SIZES = """
1280x1280 848x1280 1280x848 960x1280 1280x960 1024x1280 1280x1024 720x1280 1280x720 1280x544
2048x2048 1360x2048 2048x1360 1536x2048 2048x1536 1632x2048 2048x1632 1152x2048 2048x1152 2048x864
2880x2880 2336x3520 3520x2336 2480x3312 3312x2480 2560x3216 3216x2560 2160x3840 3840x2160 3840x1632
""".split()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """One client for the module: a new one per call costs more than the fake's answer."""
    with httpx.Client() as client:
        yield client


def generate(
    http: httpx.Client,
    url: str,
    body: dict[str, Any],
    key: str = UPSTREAM_KEY,
    timeout: float = 10,
) -> httpx.Response:
    return http.post(
        url + "/v1/images/generations",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=timeout,
    )


def vip(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-image-2-vip", "prompt": "a lighthouse", **fields}


def provider_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The provider family's error shape: OpenAI's four fields, a request id in the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "(request id: " in error["message"]
    assert error["param"] == ""
    return error


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature and CRC."""
    assert data[:8] == PNG
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    (crc,) = struct.unpack(">I", data[29:33])
    assert crc == zlib.crc32(data[12:29])
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def image_part(tag: int) -> bytes:
    """Distinct bytes the fake takes for a PNG (it looks at the signature only)."""
    return PNG + bytes([tag]) * 32


# auth and billing --------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization", ["Bearer wrong-key", "Bearer", "Basic " + UPSTREAM_KEY, UPSTREAM_KEY, None]
)
def test_bearer_key_is_checked(fake: Fake, authorization: str | None) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    response = httpx.post(fake[1].url + "/v1/images/generations", json=vip(), headers=headers)
    error = provider_error(response, 401)
    assert error["code"] == "invalid_api_key"
    assert billing(fake[1]) == {"images_billed": 0, "requests": []}


def test_fake_without_a_key_takes_any_bearer(http: httpx.Client) -> None:
    with ThreadServer(create_fake_app(FakeUpstream(api_key=None))) as server:
        assert generate(http, server.url, vip(), key="anything").status_code == 200
        response = http.post(
            server.url + "/v1/images/generations", json=vip(), headers={"authorization": "Bearer"}
        )
        provider_error(response, 401)


def test_n_is_billed_but_one_image_returns(http: httpx.Client, fake: Fake) -> None:
    response = generate(http, fake[1].url, vip(n=3, response_format="b64_json"))
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1
    log = billing(fake[1])
    assert log["images_billed"] == 3
    assert [(r["n"], r["billed"]) for r in log["requests"]] == [(3, True)]
    assert generate(http, fake[1].url, vip(response_format="url")).status_code == 200
    assert billing(fake[1])["images_billed"] == 4


def test_billing_log_has_the_spec_shape(http: httpx.Client, fake: Fake) -> None:
    generate(http, fake[1].url, vip(size="2048x1152", response_format="url"))
    log = billing(fake[1])
    assert set(log) == {"images_billed", "requests"}
    entry = log["requests"][0]
    assert {k: entry[k] for k in ("model", "size", "n", "response_format")} == {
        "model": "gpt-image-2-vip",
        "size": "2048x1152",
        "n": None,
        "response_format": "url",
    }
    assert httpx.post(fake[1].url + "/_fake/reset").status_code == 200
    assert billing(fake[1]) == {"images_billed": 0, "requests": []}


# what the provider refuses -----------------------------------------------------------


def test_size_separator_must_be_a_lowercase_ascii_x(http: httpx.Client, fake: Fake) -> None:
    for size in ["2048×1152", "2048X1152", "2048*1152", "2048 x 1152", " 2048x1152", "2048✕1152"]:
        error = provider_error(generate(http, fake[1].url, vip(size=size)), 400)
        assert (error["type"], error["code"]) == ("new_api_error", "invalid_size"), size
    assert billing(fake[1])["images_billed"] == 0


@pytest.mark.parametrize(
    "extra", [{"quality": "high"}, {"aspect_ratio": "16:9"}, {"style": "vivid"}, {"stream": False}]
)
def test_fields_the_provider_does_not_take_are_refused_unbilled(
    http: httpx.Client, fake: Fake, extra: dict[str, Any]
) -> None:
    error = provider_error(generate(http, fake[1].url, vip(**extra)), 400)
    assert next(iter(extra)) in error["message"]
    assert billing(fake[1])["images_billed"] == 0


def test_vip_refuses_sizes_outside_its_table(http: httpx.Client, fake: Fake) -> None:
    for size in ["1024x1024", "1536x1024", "999x999", "2048x1153", "big", "1280x1280 "]:
        error = provider_error(generate(http, fake[1].url, vip(size=size)), 400)
        assert error["code"] == "invalid_size", size
    assert billing(fake[1])["images_billed"] == 0


def test_fake_table_is_the_specs() -> None:
    assert set(SPEC_VIP_SIZES) == VIP_SIZES
    assert len(SPEC_VIP_SIZES) == 30


def test_vip_takes_all_thirty_sizes_auto_and_none(http: httpx.Client, fake: Fake) -> None:
    for size in [*SPEC_VIP_SIZES, "auto", None]:
        body = vip(response_format="url") if size is None else vip(size=size)
        response = generate(http, fake[1].url, body)
        assert response.status_code == 200, (size, response.text)
    assert billing(fake[1])["images_billed"] == 32


ALL_SIZES = {
    "512x512": 200,
    "1536x1536": 200,
    "1536x1024": 200,
    "1024x1536": 200,
    "512x1": 200,
    "auto": 200,
    None: 200,
    "511x511": 400,
    "1537x1024": 400,
    "2048x1152": 400,
    "0x1024": 400,
    "1024×1024": 400,
    "1024x1024\n": 400,
}


def test_all_takes_a_long_edge_of_512_to_1536(http: httpx.Client, fake: Fake) -> None:
    for size, status in ALL_SIZES.items():
        body = {"model": "gpt-image-2-all", "prompt": "x", "response_format": "url"}
        if size is not None:
            body["size"] = size
        response = generate(http, fake[1].url, body)
        assert response.status_code == status, (size, response.text)
        assert (check_generation(body) is None) == (status == 200), size
    accepted = sum(status == 200 for status in ALL_SIZES.values())
    assert billing(fake[1])["images_billed"] == accepted


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"model": "gpt-image-1", "prompt": "x"}, "model_not_found"),
    ({"prompt": "x"}, "model_not_found"),
    ({"model": "gpt-image-2-vip"}, "invalid_request"),
    ({"model": "gpt-image-2-vip", "prompt": " "}, "invalid_request"),
    ({"model": "gpt-image-2-vip", "prompt": "x", "response_format": "png"}, "invalid_request"),
    ({"model": "gpt-image-2-vip", "prompt": "x", "n": 0}, "invalid_request"),
    ({"model": "gpt-image-2-vip", "prompt": "x", "n": "2"}, "invalid_request"),
]


def test_other_bad_bodies_are_400_unbilled(http: httpx.Client, fake: Fake) -> None:
    for body, code in BAD_BODIES:
        assert provider_error(generate(http, fake[1].url, body), 400)["code"] == code, body
    assert billing(fake[1])["images_billed"] == 0


def test_invalid_json_is_400(fake: Fake) -> None:
    response = httpx.post(
        fake[1].url + "/v1/images/generations",
        content=b"{nope",
        headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
    )
    provider_error(response, 400)


def test_models_lists_both_models(fake: Fake) -> None:
    response = httpx.get(fake[1].url + "/v1/models")
    assert {m["id"] for m in response.json()["data"]} == {"gpt-image-2-vip", "gpt-image-2-all"}


# answers -----------------------------------------------------------------------------


def test_b64_json_is_a_prefixed_real_png(http: httpx.Client, fake: Fake) -> None:
    response = generate(http, fake[1].url, vip(response_format="b64_json"))
    assert response.status_code == 200
    body = response.json()
    b64 = body["data"][0]["b64_json"]
    assert b64.startswith(PREFIX)
    with pytest.raises(ValueError):
        base64.b64decode(b64, validate=True)  # the provider's trap for OpenAI clients
    width, height = png_size(base64.b64decode(b64[len(PREFIX) :], validate=True))
    assert 1 <= width <= 4096 and 1 <= height <= 4096
    assert isinstance(body["created"], int) and body["created"] > 1_700_000_000


def test_url_answer_carries_a_url(http: httpx.Client, fake: Fake) -> None:
    body = generate(http, fake[1].url, vip(response_format="url")).json()
    [image] = body["data"]
    assert set(image) == {"url"}
    assert image["url"].startswith("https://") and image["url"].endswith(".png")
    assert isinstance(body["created"], int)


def test_created_may_be_missing(http: httpx.Client, fake: Fake) -> None:
    no_created = generate(
        http, fake[1].url, vip(prompt="[fake:no-created] x", response_format="url")
    )
    assert no_created.status_code == 200
    assert "created" not in no_created.json()
    assert no_created.json()["data"][0]["url"]
    all_model = {"model": "gpt-image-2-all", "prompt": "x", "response_format": "b64_json"}
    assert "created" not in generate(http, fake[1].url, all_model).json()


def test_image_bytes_directive_pads_the_png(http: httpx.Client, fake: Fake) -> None:
    size = 300_000
    response = generate(
        http, fake[1].url, vip(prompt=f"[fake:image-bytes={size}] x", response_format="b64_json")
    )
    assert len(response.content) >= size
    b64 = response.json()["data"][0]["b64_json"]
    png = base64.b64decode(b64.removeprefix(PREFIX), validate=True)
    assert len(png) == size
    assert png_size(png) == (8, 8)
    assert png.endswith(b"IEND\xaeB`\x82")


def test_latency_setting_and_directive(http: httpx.Client, fake: Fake) -> None:
    start = time.monotonic()
    assert generate(http, fake[1].url, vip(prompt="[fake:latency=0.3] x")).status_code == 200
    assert time.monotonic() - start >= 0.3
    assert httpx.post(fake[1].url + "/_fake/config", json={"latency": 0.2}).status_code == 200
    start = time.monotonic()
    assert generate(http, fake[1].url, vip()).status_code == 200
    assert time.monotonic() - start >= 0.2


# faults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "statuses", "type_", "code"),
    [
        ("500", range(500, 600), None, None),
        ("429", (429,), "rate_limit_error", None),
        ("quota", (403, 429), None, "insufficient_user_quota"),
        ("moderation", (400, 451), None, "moderation_blocked"),
    ],
)
def test_fault_directives_answer_like_the_provider(
    http: httpx.Client,
    fake: Fake,
    fault: str,
    statuses: range | tuple[int, ...],
    type_: str | None,
    code: str | None,
) -> None:
    response = generate(http, fake[1].url, vip(prompt=f"a cat [fake:{fault}]"))
    error = provider_error(response, response.status_code)
    assert response.status_code in statuses
    if type_ is not None:
        assert error["type"] == type_
    if code is not None:
        assert error["code"] == code
    if fault == "429":
        assert int(response.headers["retry-after"]) >= 1
    log = billing(fake[1])
    assert log["images_billed"] == 0
    assert [r["outcome"] for r in log["requests"]] == [fault]


def test_error_in_a_200(http: httpx.Client, fake: Fake) -> None:
    response = generate(http, fake[1].url, vip(prompt="[fake:error200] x"))
    assert response.status_code == 200
    body = response.json()
    assert "data" not in body
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_timeout_is_billed_and_never_answers(http: httpx.Client, fake: Fake) -> None:
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        generate(http, fake[1].url, vip(prompt="[fake:timeout] x", n=2), timeout=0.5)
    assert time.monotonic() - start < 5
    log = billing(fake[1])
    assert log["images_billed"] == 2
    assert [(r["outcome"], r["billed"]) for r in log["requests"]] == [("timeout", True)]


def test_reset_is_billed_and_drops_the_connection(http: httpx.Client, fake: Fake) -> None:
    with pytest.raises(httpx.TransportError) as info:
        generate(http, fake[1].url, vip(prompt="[fake:reset] x"))
    assert not isinstance(info.value, httpx.TimeoutException)
    log = billing(fake[1])
    assert log["images_billed"] == 1
    assert [(r["outcome"], r["billed"]) for r in log["requests"]] == [("reset", True)]


def test_cut_is_billed_and_breaks_off_a_200(http: httpx.Client, fake: Fake) -> None:
    received = bytearray()
    body = vip(prompt="[fake:cut=150] x", response_format="b64_json")
    headers = {"authorization": f"Bearer {UPSTREAM_KEY}"}
    url = fake[1].url + "/v1/images/generations"
    with (
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("POST", url, json=body, headers=headers) as response,
    ):
        assert response.status_code == 200  # the status comes, then the body breaks off
        for chunk in response.iter_bytes():
            received += chunk
    assert len(received) == 150
    assert received.startswith(b'{"created":')
    assert billing(fake[1])["images_billed"] == 1


def outcomes(http: httpx.Client, fake: FakeUpstream, count: int, workers: int = 1) -> list[str]:
    with ThreadServer(create_fake_app(fake)) as server:

        def one(i: int) -> None:
            try:
                generate(
                    http, server.url, vip(prompt=f"cat {i}", response_format="url"), timeout=0.3
                )
            except httpx.TransportError:
                pass  # timeouts and resets are among the injected faults

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(count)))
        return [r["outcome"] for r in billing(server)["requests"]]


def test_fail_rate_injects_about_that_share_of_faults(http: httpx.Client) -> None:
    fake = FakeUpstream(api_key=UPSTREAM_KEY, fail_rate=0.4, seed=11)
    seen = outcomes(http, fake, 80, workers=8)
    assert len(seen) == 80
    faults = [o for o in seen if o != "ok"]
    assert 0.2 <= len(faults) / len(seen) <= 0.6
    assert len(set(faults)) >= 3
    assert set(faults) <= {"timeout", "reset", "500", "429", "quota", "moderation", "error200"}
    assert outcomes(http, FakeUpstream(api_key=UPSTREAM_KEY), 10, workers=4) == ["ok"] * 10


def test_fail_rate_is_deterministic_with_a_seed(http: httpx.Client) -> None:
    first = outcomes(http, FakeUpstream(api_key=UPSTREAM_KEY, fail_rate=0.3, seed=5), 12)
    again = outcomes(http, FakeUpstream(api_key=UPSTREAM_KEY, fail_rate=0.3, seed=5), 12)
    assert first == again
    assert "ok" in first and set(first) != {"ok"}


# edits -------------------------------------------------------------------------------


def edit(
    http: httpx.Client,
    url: str,
    parts: list[tuple[str, bytes]],
    key: str = UPSTREAM_KEY,
    **fields: str,
) -> httpx.Response:
    data = {"model": "gpt-image-2-vip", "prompt": "merge them", "response_format": "url"}
    files = [(name, (f"{i}.png", content, "image/png")) for i, (name, content) in enumerate(parts)]
    return http.post(
        url + "/v1/images/edits",
        data={**data, **fields},
        files=files,
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )


@pytest.mark.parametrize(("name", "count"), [("image", 1), ("image[]", 2), ("image[]", 16)])
def test_edits_take_1_to_16_images_in_order(
    http: httpx.Client, fake: Fake, name: str, count: int
) -> None:
    parts = [(name, image_part(count - i)) for i in range(count)]
    response = edit(http, fake[1].url, parts, size="1280x1280")
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["url"]
    [entry] = billing(fake[1])["requests"]
    assert entry["route"] == "edits"
    assert entry["images"] == count
    assert entry["size"] == "1280x1280"
    sent = [content for _, content in parts]
    received_order = entry["image_sha256"]
    assert len(received_order) == count
    assert len(set(received_order)) == count
    # Reversing the parts reverses what the fake records.
    httpx.post(fake[1].url + "/_fake/reset")
    assert edit(http, fake[1].url, [(name, c) for c in reversed(sent)]).status_code == 200
    assert billing(fake[1])["requests"][0]["image_sha256"] == received_order[::-1]


def test_edits_mix_image_and_image_brackets(http: httpx.Client, fake: Fake) -> None:
    parts = [("image", image_part(1)), ("image[]", image_part(2)), ("image", image_part(3))]
    assert edit(http, fake[1].url, parts).status_code == 200
    assert billing(fake[1])["requests"][0]["images"] == 3


def test_edits_refuse_too_many_none_or_non_images(http: httpx.Client, fake: Fake) -> None:
    too_many = [("image[]", image_part(i)) for i in range(17)]
    provider_error(edit(http, fake[1].url, too_many), 400)
    provider_error(edit(http, fake[1].url, []), 400)
    assert provider_error(edit(http, fake[1].url, [("image", b"not an image")]), 400)["code"] == (
        "invalid_image"
    )
    assert billing(fake[1])["images_billed"] == 0


def test_edits_follow_the_generation_rules(http: httpx.Client, fake: Fake) -> None:
    parts = [("image", image_part(1))]
    assert provider_error(edit(http, fake[1].url, parts, size="1280×1280"), 400)["code"] == (
        "invalid_size"
    )
    provider_error(edit(http, fake[1].url, parts, quality="high"), 400)
    provider_error(edit(http, fake[1].url, parts, key="wrong"), 401)
    assert edit(http, fake[1].url, parts, n="3").status_code == 200
    assert billing(fake[1])["images_billed"] == 3
    response = edit(http, fake[1].url, parts, prompt="[fake:quota] x")
    assert provider_error(response, 403)["code"] == "insufficient_user_quota"


def test_edit_b64_json_is_prefixed_png(http: httpx.Client, fake: Fake) -> None:
    response = edit(http, fake[1].url, [("image", image_part(1))], response_format="b64_json")
    b64 = response.json()["data"][0]["b64_json"]
    assert b64.startswith(PREFIX)
    assert base64.b64decode(b64[len(PREFIX) :]).startswith(PNG)


# the command -------------------------------------------------------------------------


@pytest.fixture
def fake_process() -> Iterator[str]:
    """``python -m proxy fake-upstream --port P --latency 0.3`` as a child process."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "fake-upstream", "--port", str(port), "--latency", "0.3"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, "fake-upstream exited"
            try:
                if httpx.get(url + "/_fake/billing", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "fake-upstream did not start"
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_command_serves_the_fake_with_latency(http: httpx.Client, fake_process: str) -> None:
    start = time.monotonic()
    response = generate(http, fake_process, vip(size="1280x720", response_format="b64_json"))
    assert time.monotonic() - start >= 0.3
    assert response.status_code == 200
    assert response.json()["data"][0]["b64_json"].startswith(PREFIX)
    log = httpx.get(fake_process + "/_fake/billing").json()
    assert set(log) == {"images_billed", "requests"}
    assert isinstance(log["images_billed"], int) and log["images_billed"] == 1
    [entry] = log["requests"]
    assert {"model", "size", "n", "response_format"} <= set(entry)
    assert (entry["model"], entry["size"], entry["n"], entry["response_format"]) == (
        "gpt-image-2-vip",
        "1280x720",
        None,
        "b64_json",
    )
