"""The console over HTTP: its guard (session, CSRF, origin), its headers, and that bad
input or a store away gives a page that says so, never a 500."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from proxy.app import create_app
from proxy.console.pages import _limits
from proxy.errors import InvalidRequest
from tests.conftest import ADMIN_TOKEN, PEPPER, Proxy, ThreadServer, free_port, settings_for

PAGES = ["/console", "/console/keys", "/console/teams", "/console/usage", "/console/calls"]


@pytest.fixture
def browser_like(proxy: Proxy) -> Iterator[httpx.Client]:
    """A client holding a signed-in session's cookie."""
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        signed_in = client.post("/console/login", data={"token": ADMIN_TOKEN})
        assert signed_in.status_code == 303, signed_in.text
        yield client


def csrf_of(client: httpx.Client, path: str = "/console/keys") -> str:
    page = client.get(path)
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


def admin_keys(proxy: Proxy) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = proxy.admin("GET", "/admin/keys").json()["data"]
    return keys


def test_signed_out_the_console_is_a_sign_in_form_and_its_pages_send_you_there(
    proxy: Proxy,
) -> None:
    page = httpx.get(proxy.url + "/console")
    assert page.status_code == 200
    assert '<form method="post" action="/console/login">' in page.text
    assert 'name="token"' in page.text and 'for="token"' in page.text
    for path in PAGES[1:]:
        answer = httpx.get(proxy.url + path)
        assert answer.status_code == 303 and answer.headers["location"] == "/console", path


def test_the_session_cookie_is_httponly_strict_expiring_and_secure_behind_tls(
    proxy: Proxy,
) -> None:
    plain = httpx.post(proxy.url + "/console/login", data={"token": ADMIN_TOKEN})
    cookie = plain.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    assert re.search(r"max-age=\d+", cookie) and "secure" not in cookie
    behind_tls = httpx.post(
        proxy.url + "/console/login",
        data={"token": ADMIN_TOKEN},
        headers={"x-forwarded-proto": "https"},
    )
    assert "; secure" in behind_tls.headers["set-cookie"].lower()


def test_a_wrong_token_is_refused_without_a_cookie(proxy: Proxy) -> None:
    for form in ({"token": "x" * 40}, {"token": ""}, {}):
        answer = httpx.post(proxy.url + "/console/login", data=form)
        assert answer.status_code == 401 and "set-cookie" not in answer.headers
        assert "That is not the admin token." in answer.text


def test_every_page_has_a_csp_without_inline_script_and_nothing_from_elsewhere(
    browser_like: httpx.Client,
) -> None:
    for path in [*PAGES, "/console/usage?by=model&period=month"]:
        page = browser_like.get(path)
        assert page.status_code == 200, path
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert page.headers["cache-control"] == "no-store"
        html = page.text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), f"inline script on {path}"
        assert not re.search(r"\son[a-z]+=", html), f"inline handler on {path}"
        assert not re.search(r"\sstyle=", html), f"inline style on {path}"
        assert not re.search(r"(?:src|href|action)=\"(?:https?:)?//", html), path


def test_the_script_is_a_few_kilobytes(proxy: Proxy) -> None:
    script = httpx.get(proxy.url + "/console/static/console.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert len(script.content) <= 2048
    assert httpx.get(proxy.url + "/console/static/../app.py").status_code == 404


def test_a_form_without_its_csrf_token_or_with_another_sessions_changes_nothing(
    proxy: Proxy, browser_like: httpx.Client
) -> None:
    with httpx.Client(base_url=proxy.url) as other:
        other.post("/console/login", data={"token": ADMIN_TOKEN})
        stranger = csrf_of(other)
    key = proxy.new_key(name="kept")
    key_id = admin_keys(proxy)[0]["id"]
    posts = [
        ("/console/keys", {"name": "sneaky"}),
        ("/console/teams", {"name": "sneaky", "daily_usd": "1"}),
        (f"/console/keys/{key_id}", {"name": "renamed"}),
        (f"/console/keys/{key_id}/revoke", {}),
        ("/console/logout", {}),
    ]
    for path, form in posts:
        for csrf in (None, stranger, ""):
            data = form if csrf is None else {**form, "csrf": csrf}
            answer = browser_like.post(path, data=data)
            assert answer.status_code == 403, (path, csrf)
            assert "CSRF token" in answer.text
    assert [k["name"] for k in admin_keys(proxy)] == ["kept"]
    assert not admin_keys(proxy)[0]["revoked"]
    assert proxy.admin("GET", "/admin/teams").json()["data"] == []
    assert browser_like.get("/console/keys").status_code == 200  # still signed in
    assert key


def test_a_form_sent_from_another_site_is_refused_even_with_its_token(
    browser_like: httpx.Client, proxy: Proxy
) -> None:
    csrf = csrf_of(browser_like)
    for headers in ({"origin": "http://evil.example"}, {"sec-fetch-site": "cross-site"}):
        answer = browser_like.post(
            "/console/keys", data={"csrf": csrf, "name": "x"}, headers=headers
        )
        assert answer.status_code == 403
    assert admin_keys(proxy) == []


def test_a_forged_or_signed_out_session_opens_nothing(
    proxy: Proxy, browser_like: httpx.Client
) -> None:
    cookie = browser_like.cookies["apiyi_console"]
    version, expires, nonce, signature = cookie.split(".")
    forged = [
        f"{version}.{int(expires) + 3600}.{nonce}.{signature}",  # a longer life
        f"{version}.{expires}.{nonce}x.{signature}",
        f"{version}.{expires}.{nonce}.{signature[:-2]}",
        "v1.9999999999.a.b",
        "x" * 300,
    ]
    for value in forged:
        answer = httpx.get(proxy.url + "/console/keys", cookies={"apiyi_console": value})
        assert answer.status_code == 303, value
    browser_like.post("/console/logout", data={"csrf": csrf_of(browser_like)})
    replay = httpx.get(proxy.url + "/console/keys", cookies={"apiyi_console": cookie})
    assert replay.status_code == 303


def test_a_form_not_urlencoded_or_too_large_is_refused(browser_like: httpx.Client) -> None:
    csrf = csrf_of(browser_like)
    as_json = browser_like.post("/console/keys", json={"csrf": csrf, "name": "x"})
    assert as_json.status_code == 400
    huge = browser_like.post("/console/keys", data={"csrf": csrf, "name": "x" * 20_000})
    assert huge.status_code == 400


def test_names_from_the_store_are_escaped(proxy: Proxy, browser_like: httpx.Client) -> None:
    proxy.new_key(name='<script>alert("k")</script>', team="t1")
    page = browser_like.get("/console/keys")
    assert "<script>alert" not in page.text
    assert "&lt;script&gt;alert(&#34;k&#34;)&lt;/script&gt;" in page.text


def test_bad_input_is_a_page_that_names_the_field_never_a_500(
    browser_like: httpx.Client, proxy: Proxy
) -> None:
    csrf = csrf_of(browser_like)
    cases = [
        ("/console/keys", {"name": "a", "daily_usd": "ten"}, "daily_usd"),
        ("/console/keys", {"name": "a", "rpm": "1.5"}, "rpm"),
        ("/console/keys", {"name": "a", "monthly_usd": "-1"}, "monthly_usd"),
        ("/console/keys", {"name": "a", "team": "no spaces"}, "team"),
        ("/console/keys", {"name": "a", "models": "dall-e-2"}, "models"),
        ("/console/keys", {"name": " "}, "name"),
        ("/console/teams", {"name": "", "daily_usd": "1"}, "name"),
        ("/console/teams", {"name": "ok", "daily_usd": "1e999"}, "daily_usd"),
    ]
    for path, form, field in cases:
        answer = browser_like.post(path, data={"csrf": csrf, **form})
        assert answer.status_code == 400, (form, answer.text[:200])
        assert f"{field}" in answer.text and 'role="alert"' in answer.text
    assert admin_keys(proxy) == []
    for path in [
        "/console/usage?from=yesterday",
        "/console/usage?by=colour",
        "/console/usage?from=2026-12-01&to=2026-11-01",
        "/console/calls?cursor=not-a-cursor",
        "/console/keys/key_nope",
        "/console/keys/key_nope/revoke",
    ]:
        answer = browser_like.get(path)
        assert 400 <= answer.status_code < 500, path
        assert 'role="alert"' in answer.text, path


def test_a_store_away_is_a_503_page(
    start_proxy: Callable[..., Proxy], fake: tuple[Any, ThreadServer]
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proxy = start_proxy(
        fake[1].url, store={"url": dead, "timeout_seconds": 0.5}, auth={"key_pepper": PEPPER}
    )
    with httpx.Client(base_url=proxy.url, timeout=20) as client:
        client.post("/console/login", data={"token": ADMIN_TOKEN})
        for path in PAGES:
            answer = client.get(path)
            assert answer.status_code == 503, path
            assert "unavailable" in answer.text


def test_without_an_admin_token_the_console_is_off(fake: tuple[Any, ThreadServer]) -> None:
    settings = settings_for(fake[1].url)
    settings = replace(settings, auth=replace(settings.auth, admin_token=None))
    with ThreadServer(create_app(settings)) as server:
        answers = [
            httpx.request(method, server.url + path, data={"token": ADMIN_TOKEN})
            for method, path in [
                ("GET", "/console"),
                ("POST", "/console/login"),
                ("GET", "/console/keys"),
            ]
        ]
    for answer in answers:
        assert answer.status_code == 404
        assert "APIYI_PROXY_ADMIN_TOKEN" in answer.text


@pytest.mark.parametrize(
    ("text", "value"),
    [("", None), (" ", None), ("5", 5), ("0", 0), ("0.30", 0.3), ("$1,000.50", 1000.5)],
)
def test_a_limit_field_blank_is_no_limit_and_a_number_is_taken(text: str, value: Any) -> None:
    assert _limits({"daily_usd": text}, ("daily_usd",)) == {"daily_usd": value}


@pytest.mark.parametrize("text", ["ten", "1..2", "NaN", "inf", "0x10"])
def test_a_limit_field_that_is_not_a_number_is_refused_naming_it(text: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        _limits({"rpm": text}, ("rpm",))
    assert refused.value.param == "rpm"


def test_the_calls_list_pages_through_the_log_newest_first(
    proxy: Proxy, browser_like: httpx.Client
) -> None:
    key = proxy.new_key(name="pager")
    client = proxy.sdk(key, max_retries=0)
    for prompt in ("one", "two", "three"):
        client.images.generate(model="gpt-image-2-vip", prompt=prompt)
    seen: list[str] = []
    path: str | None = "/console/calls?limit=2"
    pages = 0
    while path is not None:
        for _ in range(50):  # the log's writer runs in the background
            page = browser_like.get(path)
            found = re.findall(r"<code>(req_[0-9a-f]+)</code>", page.text)
            if pages or len(found) == 2:
                break
            time.sleep(0.05)
        assert page.status_code == 200
        seen += found
        pages += 1
        older = re.search(r'href="(/console/calls\?[^"]*cursor=[^"]+)">Older', page.text)
        path = older.group(1).replace("&amp;", "&") if older else None
    assert pages == 2 and len(seen) == 3 and len(set(seen)) == 3


def test_the_keys_list_pages_by_fifty_and_search_narrows_it(
    proxy: Proxy, browser_like: httpx.Client
) -> None:
    for i in range(53):
        proxy.new_key(name=f"batch {i:02d}", team="bulk" if i % 2 else None)
    first = browser_like.get("/console/keys")
    assert "53 keys" in first.text and "Page 1 of 2" in first.text
    rows = re.findall(r'<th scope="row"><a href="/console/keys/key_', first.text)
    assert len(rows) == 50
    second = browser_like.get("/console/keys?page=2")
    assert len(re.findall(r'<th scope="row"><a href="/console/keys/key_', second.text)) == 3
    narrowed = browser_like.get("/console/keys?q=BATCH 1")  # name, any case
    assert "10 keys matching" in narrowed.text
    by_team = browser_like.get("/console/keys?q=bulk")
    assert "26 keys matching" in by_team.text
