"""Bad input gets a clear OpenAI-shaped 4xx, never a 500, never reaches the upstream."""

from __future__ import annotations

import json
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


def test_oversized_body_is_413(proxy: Proxy, fake: Any) -> None:
    key = proxy.new_key()
    body = json.dumps({"prompt": "x", "pad": "y" * 70_000}).encode()
    error = assert_openai_error(post(proxy, key, body), 413)
    assert error["code"] == "request_too_large"
    assert billing(fake[1])["requests"] == []


def test_oversized_chunked_body_is_413(proxy: Proxy) -> None:
    key = proxy.new_key()

    def chunks() -> Any:
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(
        proxy.url + "/v1/images/generations",
        content=chunks(),
        headers={"authorization": f"Bearer {key}"},
    )
    assert_openai_error(response, 413)


def test_size_limit_comes_before_auth(proxy: Proxy) -> None:
    body = json.dumps({"prompt": "x" * 70_000}).encode()
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
