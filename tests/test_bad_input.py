"""Bad input gets a clear OpenAI-shaped 4xx, never a 500, never reaches the upstream."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.fake_upstream import make_png

from .conftest import Proxy, billing


def post(proxy: Proxy, key: str, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/images/generations",
        content=content,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json", **headers},
        timeout=10,
    )


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


BAD_BODIES = {
    "not json": (b"{nope", 400),
    "array": (b"[1, 2]", 400),
    "string": (b'"prompt"', 400),
    "empty": (b"", 400),
    "not utf-8": (b'{"prompt": "\xff\xfe"}', 400),
    "deeply nested": (b'{"prompt": "x", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    "prompt is a number": (b'{"prompt": 5}', 400),
    "prompt missing": (b'{"size": "1280x1280"}', 400),
    "size is a list": (b'{"prompt": "x", "size": ["1280x1280"]}', 400),
    "n is a string": (b'{"prompt": "x", "n": "2"}', 400),
    "n is zero": (b'{"prompt": "x", "n": 0}', 400),
    "stream": (b'{"prompt": "x", "stream": true}', 400),
    "unknown model": (b'{"prompt": "x", "model": "dall-e-9"}', 400),
    "bad response_format": (b'{"prompt": "x", "response_format": "png"}', 400),
    "prompt too long": (json.dumps({"prompt": "x" * 32_001}).encode(), 400),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_bad_bodies_are_refused_before_the_upstream(proxy: Proxy, fake: Any, name: str) -> None:
    body, status = BAD_BODIES[name]
    key = proxy.new_key()
    assert_openai_error(post(proxy, key, body), status)
    assert billing(fake[1])["requests"] == []


# The generations body limit: 12 bytes for each of 32,000 prompt characters, plus 16 KiB.
BODY_LIMIT = 12 * 32_000 + 16 * 1024


def assert_nothing_spent(proxy: Proxy, key: str, fake: Any) -> None:
    """Nothing reached the upstream, and the key neither holds nor spent money."""
    assert billing(fake[1]) == {"images_billed": 0, "requests": []}
    usage = httpx.get(proxy.url + "/v1/usage", headers={"authorization": f"Bearer {key}"})
    today = usage.json()["today"]
    assert today["requests"] == 0
    assert today["held_usd"] == today["spent_usd"] == 0


def test_oversized_body_is_413(proxy: Proxy, fake: Any) -> None:
    key = proxy.new_key()
    body = json.dumps({"prompt": "x", "pad": "y" * BODY_LIMIT}).encode()
    error = assert_openai_error(post(proxy, key, body), 413)
    assert error["code"] == "request_too_large"
    # The message says how the limit follows from the prompt limit.
    assert error["message"].startswith(f"Request body is larger than the limit of {BODY_LIMIT}")
    assert "each of the 32000 characters" in error["message"]
    assert "policy.max_body_bytes" in error["message"]
    assert_nothing_spent(proxy, key, fake)


def test_oversized_chunked_body_is_413(proxy: Proxy) -> None:
    key = proxy.new_key()

    def chunks() -> Any:
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 1000 + 1):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(
        proxy.url + "/v1/images/generations",
        content=chunks(),
        headers={"authorization": f"Bearer {key}"},
    )
    assert_openai_error(response, 413)


def test_size_limit_comes_before_auth(proxy: Proxy) -> None:
    body = json.dumps({"prompt": "x" * BODY_LIMIT}).encode()
    assert_openai_error(post(proxy, "wrong", body), 413)


def test_parse_comes_before_auth_and_auth_before_policy(proxy: Proxy) -> None:
    assert_openai_error(post(proxy, "wrong", b"{nope"), 400)
    assert_openai_error(post(proxy, "wrong", b'{"prompt": "x", "n": 3}'), 401)


def test_unknown_route_and_method_are_openai_shaped(proxy: Proxy) -> None:
    assert_openai_error(httpx.get(proxy.url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(proxy.url + "/v1/images/generations"), 405)


def test_edits_refuse_non_images_and_json(proxy: Proxy, fake: Any) -> None:
    key = proxy.new_key()
    headers = {"authorization": f"Bearer {key}"}
    not_image = httpx.post(
        proxy.url + "/v1/images/edits",
        headers=headers,
        data={"prompt": "x"},
        files={"image": ("a.png", b"not an image", "image/png")},
    )
    assert assert_openai_error(not_image, 400)["param"] == "image"
    as_json = httpx.post(proxy.url + "/v1/images/edits", headers=headers, json={"prompt": "x"})
    assert_openai_error(as_json, 400)
    no_image = httpx.post(
        proxy.url + "/v1/images/edits", headers=headers, files={"prompt": (None, "x")}
    )
    assert_openai_error(no_image, 400)
    assert billing(fake[1])["requests"] == []


@pytest.mark.parametrize("n", ["²", "\uff13", "\u0663"])
def test_edit_with_a_unicode_digit_n_is_400_and_not_billed(proxy: Proxy, fake: Any, n: str) -> None:
    key = proxy.new_key()
    response = httpx.post(
        proxy.url + "/v1/images/edits",
        headers={"authorization": f"Bearer {key}"},
        data={"prompt": "x", "n": n},
        files={"image": ("a.png", make_png(), "image/png")},
        timeout=10,
    )
    assert assert_openai_error(response, 400)["param"] == "n"
    assert billing(fake[1]) == {"images_billed": 0, "requests": []}
    usage = httpx.get(proxy.url + "/v1/usage", headers={"authorization": f"Bearer {key}"})
    assert usage.json()["today"]["requests"] == 0
    assert usage.json()["today"]["spent_usd"] == 0


def misread_form(how: str) -> tuple[bytes, str]:
    """A body and content type that the form parser alone would misread."""
    png = make_png()
    files = [("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))]
    prompt = "\\ud800" if how == "surrogates" else "x"
    request = httpx.Request("POST", "http://x/", data={"prompt": prompt}, files=files)
    body, content_type = request.read(), request.headers["content-type"]
    if how == "surrogates":  # decodes to a lone surrogate no UTF-8 body can carry
        return body, content_type.replace("; ", "; charset=unicode_escape; ")
    return body[: body.rindex(b"\r\n--") - 10], content_type  # the last image cut short


@pytest.mark.parametrize("how", ["surrogates", "cut short"])
def test_an_edit_form_the_parser_would_misread_is_400_and_not_billed(
    proxy: Proxy, fake: Any, how: str
) -> None:
    key = proxy.new_key()
    body, content_type = misread_form(how)
    response = httpx.post(
        proxy.url + "/v1/images/edits",
        headers={"authorization": f"Bearer {key}", "content-type": content_type},
        content=body,
        timeout=10,
    )
    assert_openai_error(response, 400)
    assert billing(fake[1]) == {"images_billed": 0, "requests": []}
    usage = httpx.get(proxy.url + "/v1/usage", headers={"authorization": f"Bearer {key}"})
    assert usage.json()["today"]["requests"] == 0
    assert usage.json()["today"]["held_usd"] == usage.json()["today"]["spent_usd"] == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
fields = st.sampled_from(
    ["model", "prompt", "size", "n", "quality", "response_format", "stream", "user", "style"]
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(fields, json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
    )
)
def test_no_body_makes_the_proxy_fail(proxy: Proxy, raw: bytes) -> None:
    response = post(proxy, proxy.default_key, raw)
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert_openai_error(response, response.status_code)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:443", "127.0.0.1:1"])
def test_a_trailing_slash_is_answered_directly_never_redirected_by_host(
    proxy: Proxy, fake: Any, host: str
) -> None:
    """The router's redirect built its Location from the Host header: an open redirect."""
    key = proxy.new_key()
    auth = {"authorization": f"Bearer {key}", "host": host}
    with httpx.Client(base_url=proxy.url, follow_redirects=False, timeout=10) as client:
        models = client.get("/v1/models/", headers=auth)
        healthz = client.get("/healthz/", headers={"host": host})
        generated = client.post(
            "/v1/images/generations/", json={"prompt": "x", "response_format": "url"}, headers=auth
        )
        unknown = client.get("/no/such/route/", headers={"host": host})
    for response in (models, healthz, generated):
        assert response.status_code == 200, response.text
        assert "location" not in response.headers
    assert models.json()["object"] == "list"
    assert generated.json()["data"][0]["url"]
    assert_openai_error(unknown, 404)
    assert "location" not in unknown.headers


# Limits in characters, as the caller counts them (SPEC section 5) -----------------------

CJK = "猫"  # 6 bytes in JSON's ASCII escapes
EMOJI = "\U0001f431"  # 12: a surrogate pair of escapes


@pytest.mark.parametrize("char", [CJK, EMOJI])
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_a_32000_character_prompt_is_accepted_however_long_its_json(
    proxy: Proxy, fake: Any, char: str, ensure_ascii: bool
) -> None:
    key = proxy.new_key()
    prompt = char * 32_000
    body = json.dumps({"prompt": prompt, "response_format": "url"}, ensure_ascii=ensure_ascii)
    response = post(proxy, key, body.encode())
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["url"]
    sent = billing(fake[1])["requests"]
    assert [(r["model"], r["billed"]) for r in sent] == [("gpt-image-2-vip", True)]


@pytest.mark.parametrize("char", ["x", CJK, EMOJI])
def test_a_32001_character_prompt_is_400_naming_prompt_never_413(
    proxy: Proxy, fake: Any, char: str
) -> None:
    key = proxy.new_key()
    body = json.dumps({"prompt": char * 32_001, "size": "1280x1280", "user": "u" * 1000})
    error = assert_openai_error(post(proxy, key, body.encode()), 400)
    assert (error["param"], error["code"]) == ("prompt", "prompt_too_long")
    assert_nothing_spent(proxy, key, fake)


def test_a_configured_body_limit_below_the_prompts_is_raised(
    fake: Any, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(fake[1].url, policy={"max_body_bytes": 1024})
    key = proxy.new_key()
    body = json.dumps({"prompt": EMOJI * 32_000, "response_format": "url"}).encode()
    assert len(body) > 380_000
    assert post(proxy, key, body).status_code == 200
    too_long = json.dumps({"prompt": EMOJI * 32_001}).encode()
    assert assert_openai_error(post(proxy, key, too_long), 400)["param"] == "prompt"
    oversized = json.dumps({"prompt": "x", "pad": "y" * BODY_LIMIT}).encode()
    assert_openai_error(post(proxy, key, oversized), 413)
    assert billing(fake[1])["images_billed"] == 1


def edit(proxy: Proxy, key: str, data: dict[str, str], files: list[Any]) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/images/edits",
        headers={"authorization": f"Bearer {key}"},
        data=data,
        files=files,
        timeout=30,
    )


def test_edit_prompt_limit_counts_characters(proxy: Proxy, fake: Any) -> None:
    key = proxy.new_key()
    image = [("image", ("a.png", make_png(), "image/png"))]
    ok = edit(proxy, key, {"prompt": EMOJI * 32_000, "response_format": "url"}, image)
    assert ok.status_code == 200, ok.text
    assert billing(fake[1])["images_billed"] == 1
    other = proxy.new_key()
    too_long = edit(proxy, other, {"prompt": CJK * 32_001}, image)
    error = assert_openai_error(too_long, 400)
    assert (error["param"], error["code"]) == ("prompt", "prompt_too_long")
    assert billing(fake[1])["images_billed"] == 1
    usage = httpx.get(proxy.url + "/v1/usage", headers={"authorization": f"Bearer {other}"})
    assert usage.json()["today"]["requests"] == 0


# Fields whose loss changes the picture (SPEC section 5) --------------------------------

PICTURE_FIELDS = {
    "mask": "mask.png",
    "background": "transparent",
    "output_format": "jpeg",
    "output_compression": 50,
    "aspect_ratio": "16:9",
    "partial_images": 2,
}


@pytest.mark.parametrize("policy", ["strip", "reject"])
def test_fields_that_change_the_picture_are_400_and_not_billed(
    fake: Any, start_proxy: Callable[..., Proxy], policy: str
) -> None:
    proxy = start_proxy(fake[1].url, policy={"unsupported_fields": policy})
    key = proxy.new_key()
    for name, value in PICTURE_FIELDS.items():
        body = json.dumps({"prompt": "x", name: value, "quality": "high"}).encode()
        error = assert_openai_error(post(proxy, key, body), 400)
        assert (error["param"], error["code"]) == (name, "unsupported_field")
        assert "different picture" in error["message"]
        form = {"prompt": "x", name: str(value)}
        error = assert_openai_error(edit(proxy, key, form, [("image", make_png())]), 400)
        assert error["param"] == name
    assert_nothing_spent(proxy, key, fake)


@pytest.mark.parametrize("image_field", ["image", "image[]"])
def test_an_edit_with_a_mask_file_is_400_and_not_billed(
    proxy: Proxy, fake: Any, image_field: str
) -> None:
    key = proxy.new_key()
    png = make_png()
    files = [(image_field, ("a.png", png, "image/png")), ("mask", ("m.png", png, "image/png"))]
    error = assert_openai_error(edit(proxy, key, {"prompt": "x"}, files), 400)
    assert (error["param"], error["code"]) == ("mask", "unsupported_field")
    assert_nothing_spent(proxy, key, fake)
    # The same edit without its mask is taken: image and image[] are the upstream's own.
    files = [(image_field, ("a.png", png, "image/png"))] * 2
    response = edit(proxy, key, {"prompt": "x", "response_format": "url"}, files)
    assert response.status_code == 200, response.text
    assert billing(fake[1])["requests"][0]["images"] == 2


def test_an_edit_image_sent_as_text_is_400_and_not_billed(proxy: Proxy, fake: Any) -> None:
    key = proxy.new_key()
    data = {"prompt": "x", "image[]": "https://example.com/a.png"}
    response = edit(proxy, key, data, [("image[]", ("a.png", make_png(), "image/png"))])
    assert assert_openai_error(response, 400)["param"] == "image[]"
    assert_nothing_spent(proxy, key, fake)
