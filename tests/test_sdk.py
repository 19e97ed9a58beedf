"""The real openai SDK → the proxy → the fake upstream, over real sockets."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import openai
import pytest

from .conftest import Proxy, billing

PNG = b"\x89PNG\r\n\x1a\n"


def client(proxy: Proxy, key: str, **kwargs: Any) -> openai.OpenAI:
    return proxy.sdk(key, max_retries=0, **kwargs)


def test_generate_with_unicode_size_sends_ascii_x(proxy: Proxy, fake: Any) -> None:
    sdk = client(proxy, proxy.new_key())
    result = sdk.images.generate(
        model="gpt-image-2-vip",
        prompt="a lighthouse",
        size="2048×1152",  # type: ignore[arg-type]
    )
    assert result.data is not None and len(result.data) == 1
    assert result.created > 0
    sent = billing(fake[1])["requests"]
    assert [r["size"] for r in sent] == ["2048x1152"]
    assert sent[0]["response_format"] == "b64_json"
    assert sent[0]["n"] is None


def test_b64_json_decodes_to_png(proxy: Proxy) -> None:
    sdk = client(proxy, proxy.new_key())
    result = sdk.images.generate(prompt="a cat", response_format="b64_json")
    assert result.data is not None
    b64 = result.data[0].b64_json
    assert b64 is not None and not b64.startswith("data:")
    assert base64.b64decode(b64, validate=True).startswith(PNG)


def test_url_response(proxy: Proxy, fake: Any) -> None:
    sdk = client(proxy, proxy.new_key())
    result = sdk.images.generate(prompt="a dog", response_format="url", size="1024x1024")
    assert result.data is not None and result.data[0].url
    assert result.data[0].url.startswith("https://")
    # The OpenAI size was mapped to the same-ratio 1K tier and reported.
    assert billing(fake[1])["requests"][0]["size"] == "1280x1280"


def test_adjusted_header_reports_changes(proxy: Proxy) -> None:
    sdk = client(proxy, proxy.new_key())
    raw = sdk.images.with_raw_response.generate(
        prompt="x",
        size="2048 × 1152",
        quality="high",  # type: ignore[arg-type]
    )
    adjusted = raw.headers["x-proxy-adjusted"]
    assert "size=2048x1152" in adjusted
    assert "quality" in adjusted
    assert raw.headers["x-request-id"]


def test_n_3_is_refused_and_nothing_billed(proxy: Proxy, fake: Any) -> None:
    sdk = client(proxy, proxy.new_key())
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(prompt="three cats", n=3)
    assert info.value.code == "n_not_supported"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert billing(fake[1]) == {"images_billed": 0, "requests": []}


def test_bad_size_names_the_param(proxy: Proxy, fake: Any) -> None:
    sdk = client(proxy, proxy.new_key())
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(prompt="x", size="999x999")  # type: ignore[arg-type]
    assert info.value.param == "size"
    assert "1280x1280" in info.value.message
    assert billing(fake[1])["images_billed"] == 0


def test_wrong_key_is_authentication_error(proxy: Proxy, fake: Any) -> None:
    proxy.new_key()
    sdk = client(proxy, "sk-not-a-real-key")
    with pytest.raises(openai.AuthenticationError):
        sdk.images.generate(prompt="x")
    assert billing(fake[1])["requests"] == []


def test_models_lists_models_and_aliases(proxy: Proxy) -> None:
    sdk = client(proxy, proxy.new_key())
    ids = {m.id for m in sdk.models.list()}
    assert {"gpt-image-2-vip", "gpt-image-2-all", "gpt-image-1"} <= ids


@pytest.mark.parametrize("name", ["gpt-image-2-vip", "gpt-image-2-all"])
def test_models_retrieve_a_served_model(proxy: Proxy, name: str) -> None:
    sdk = client(proxy, proxy.new_key())
    model = sdk.models.retrieve(name)
    assert (model.id, model.object, model.owned_by) == (name, "model", "apiyi-proxy")
    assert model.created > 0
    assert getattr(model, "alias_of", None) is None
    listed = {m.id: m for m in sdk.models.list()}
    assert listed[name] == model


@pytest.mark.parametrize(
    ("alias", "target"),
    [
        ("gpt-image-1", "gpt-image-2-vip"),
        ("gpt-image-1.5", "gpt-image-2-vip"),
        ("gpt-image-1-mini", "gpt-image-2-all"),
        ("dall-e-3", "gpt-image-2-vip"),
    ],
)
def test_models_retrieve_an_alias_shows_what_it_maps_to(
    proxy: Proxy, alias: str, target: str
) -> None:
    sdk = client(proxy, proxy.new_key())
    model = sdk.models.retrieve(alias)
    assert (model.id, model.object) == (alias, "model")
    assert model.alias_of == target  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["dall-e-9", "GPT-IMAGE-2-VIP", "gpt-image-2", "a:b.c", "猫"])
def test_models_retrieve_an_unknown_model_is_not_found(proxy: Proxy, fake: Any, name: str) -> None:
    sdk = client(proxy, proxy.new_key())
    with pytest.raises(openai.NotFoundError) as info:
        sdk.models.retrieve(name)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    assert info.value.type == "invalid_request_error"
    assert "gpt-image-2-vip" in info.value.message
    assert info.value.response.headers["x-request-id"]
    assert billing(fake[1])["requests"] == []


def test_models_retrieve_without_v1_and_with_a_slash(proxy: Proxy) -> None:
    for path in ("/models/gpt-image-1", "/v1/models/gpt-image-1/"):
        response = httpx.get(proxy.url + path)
        assert response.status_code == 200, path
        assert response.json()["alias_of"] == "gpt-image-2-vip"
    unknown = httpx.get(proxy.url + "/models/a/b")
    assert unknown.status_code == 404
    assert set(unknown.json()["error"]) == {"message", "type", "param", "code"}
    assert unknown.json()["error"]["code"] == "model_not_found"


def test_an_edit_with_a_mask_is_refused_and_nothing_billed(proxy: Proxy, fake: Any) -> None:
    """The upstream takes no mask: stripped, it would bill an edit of the whole image."""
    sdk = client(proxy, proxy.new_key())
    png = _tiny_png()
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.edit(
            image=("a.png", png, "image/png"),
            mask=("m.png", png, "image/png"),
            prompt="replace the sky",
        )
    assert (info.value.param, info.value.code) == ("mask", "unsupported_field")
    assert "different picture" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(prompt="a logo", background="transparent", output_format="webp")
    assert info.value.param == "background"
    assert billing(fake[1]) == {"images_billed": 0, "requests": []}


def test_edit_passes_images_in_order(proxy: Proxy, fake: Any) -> None:
    sdk = client(proxy, proxy.new_key())
    png = _tiny_png()
    result = sdk.images.edit(
        model="gpt-image-2-vip",
        image=[("a.png", png, "image/png"), ("b.png", png, "image/png")],
        prompt="merge them",
        size="1280x1280",
    )
    assert result.data is not None
    assert base64.b64decode(result.data[0].b64_json or "").startswith(PNG)
    entry = billing(fake[1])["requests"][0]
    assert entry["size"] == "1280x1280"
    assert entry.get("images") == 2


def test_upstream_moderation_passes_as_400(proxy: Proxy, fake: Any) -> None:
    sdk = client(proxy, proxy.new_key())
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(prompt="[fake:moderation] something")
    assert info.value.code == "moderation_blocked"
    assert info.value.response.headers["x-should-retry"] == "false"


def test_upstream_error_in_200_is_502(proxy: Proxy) -> None:
    sdk = client(proxy, proxy.new_key())
    with pytest.raises(openai.InternalServerError) as info:
        sdk.images.generate(prompt="[fake:error200] x")
    assert info.value.status_code == 502


def test_upstream_429_passes_with_retry_after(proxy: Proxy) -> None:
    key = proxy.new_key()
    response = httpx.post(
        proxy.url + "/v1/images/generations",
        headers={"authorization": f"Bearer {key}"},
        json={"prompt": "[fake:429] x"},
    )
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_upstream_5xx_is_502_and_released(proxy: Proxy) -> None:
    key = proxy.new_key(daily_usd=0.03)
    for _ in range(2):
        response = httpx.post(
            proxy.url + "/v1/images/generations",
            headers={"authorization": f"Bearer {key}"},
            json={"prompt": "[fake:500] x"},
        )
        assert response.status_code == 502
    # Both failures were refunded: the one-image budget still buys an image.
    ok = httpx.post(
        proxy.url + "/v1/images/generations",
        headers={"authorization": f"Bearer {key}"},
        json={"prompt": "fine"},
    )
    assert ok.status_code == 200


def test_upstream_key_refused_is_502_without_the_key(fake: Any, start_proxy: Any) -> None:
    proxy = start_proxy(fake[1].url)
    fake[0].api_key = "some-other-key"
    key = proxy.new_key()
    response = httpx.post(
        proxy.url + "/v1/images/generations",
        headers={"authorization": f"Bearer {key}"},
        json={"prompt": "x"},
    )
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_auth_failed"
    assert "upstream-secret" not in response.text
    assert "127.0.0.1" not in response.text


def _tiny_png() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * 2 for _ in range(2))
    ihdr = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    return PNG + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
