"""The console in a real browser: Debian's chromium driven by Playwright, against a proxy
process with a private Redis and the fake upstream, and the openai SDK as the client.

Each page is saved as a screenshot under ``build/console-screenshots/`` (the test's
artefacts), at desktop width and at phone width.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from proxy.config import StoreSettings
from proxy.console.chart import dollars
from proxy.store import HoldRequest, Periods, group_of, open_store
from tests.conftest import ADMIN_TOKEN, ROOT, ProxyProcess, RedisServer, ThreadServer, process_env

CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "build" / "console-screenshots"
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which("chromium") is None and not Path(CHROMIUM).exists():
        raise RuntimeError("chromium is not installed: apt-get install chromium (.ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def console(
    upstream: ThreadServer,
    redis_server: RedisServer,
    proxy_process: Callable[..., ProxyProcess],
) -> ProxyProcess:
    env = process_env(upstream.url, APIYI_PROXY_STORE_URL=redis_server.url)
    return proxy_process(env)


@contextlib.contextmanager
def tab(browser: Browser, base_url: str, **options: Any) -> Iterator[Page]:
    context = browser.new_context(base_url=base_url, **options)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(page: Page, token: str = ADMIN_TOKEN) -> None:
    page.goto("/console")
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def go(page: Page, section: str) -> None:
    """Follow the console's navigation to ``section``."""
    page.get_by_role("navigation", name="Console").get_by_role("link", name=section).click()


def today() -> date:
    """Today in the ledger's time zone (UTC unless configured)."""
    return datetime.now(UTC).date()


def book_earlier_days(redis_url: str, key_id: str, team: str) -> dict[str, tuple[int, int]]:
    """Spend of ``key_id`` on the 20 days before today, written to the store as settled
    calls would write it: what each day spent and the uncertain part of it."""
    booked = {}
    for back in range(1, 21):
        day = (today() - timedelta(days=back)).isoformat()
        spent = 30_000 * (1 + (back * 7) % 11)
        booked[day] = (spent, 30_000 if back % 6 == 0 else 0)

    async def book() -> None:
        store = open_store(StoreSettings(url=redis_url))
        await store.open()
        try:
            for day, (spent, uncertain) in booked.items():
                request = HoldRequest(
                    f"seed{day}@{group_of(key_id, team)}",
                    key_id,
                    spent,
                    Periods(day, day[:7]),
                    60,
                    "gpt-image-2-vip",
                    team,
                )
                await store.settle(request.hold_id, spent, uncertain, request=request)
        finally:
            await store.close()

    # Playwright's own loop runs in this thread: the store gets one of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, book()).result()
    return booked


def fits_the_width(page: Page) -> bool:
    overflow: bool = page.evaluate(
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )
    return overflow


def test_a_key_made_in_the_console_spends_shows_its_spend_and_once_revoked_gets_401(
    browser: Browser, console: ProxyProcess, redis_server: RedisServer
) -> None:
    redis_url = redis_server.url
    with tab(browser, console.url) as page:
        page.goto("/console")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        shot(page, "signin")

        # Keyboard only: the token field has the focus, typed into, Enter submits.
        expect(page.get_by_label("Admin token")).to_be_focused()
        page.keyboard.type(ADMIN_TOKEN)
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Overview")).to_be_visible()
        cookie = next(c for c in page.context.cookies() if c["name"] == "apiyi_console")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert cookie["expires"] > 0  # it expires: not a browser-session-long cookie

        go(page, "Keys")
        page.get_by_label("Name").fill("poster studio")
        page.get_by_label("Team").fill("design")
        page.get_by_label("Daily budget (USD)").fill("0.30")
        page.get_by_role("button", name="Create key").click()
        expect(page.get_by_role("heading", name="Key “poster studio” created")).to_be_visible()
        secret = page.get_by_label("The new key").input_value()
        assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", secret)
        page.get_by_role("button", name="Copy").click()
        expect(page.get_by_role("button", name="Copied")).to_be_visible()
        assert page.evaluate("navigator.clipboard.readText()") == secret
        # The screenshot must not show a usable key: blank it out first.
        page.get_by_label("The new key").evaluate("field => field.value = 'sk-…shown once…'")
        shot(page, "keys-created")

        page.goto("/console/keys")
        assert secret not in page.content()  # shown once
        expect(page.get_by_role("row", name=re.compile("poster studio"))).to_be_visible()

        client = openai.OpenAI(base_url=console.url + "/v1", api_key=secret, max_retries=0)
        image = client.images.generate(model="gpt-image-2-vip", prompt="a lighthouse at dawn")
        assert image.data and image.data[0].b64_json

        key_id = httpx.get(
            console.url + "/admin/keys", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        ).json()["data"][0]["id"]
        booked = book_earlier_days(redis_url, key_id, "design")
        page.goto("/console")
        # The chart's table holds each booked day, and today's call.
        page.get_by_text("The figures as a table").click()
        for day, (spent, uncertain) in booked.items():
            cells = page.get_by_role("row", name=re.compile(day)).get_by_role("cell")
            expect(cells).to_have_text([day, dollars(spent), dollars(uncertain)])
        totals = page.get_by_role("region", name=re.compile("Totals"))
        expect(totals).to_contain_text("$0.03")
        team_row = page.get_by_role("row", name=re.compile("design"))
        expect(team_row).to_contain_text("$0.03")
        shot(page, "overview")

        go(page, "Calls")
        call = page.get_by_role("row", name=re.compile("gpt-image-2-vip"))
        expect(call).to_contain_text("$0.03")
        expect(call).to_contain_text("settled")
        shot(page, "calls")

        go(page, "Usage")
        page.get_by_label("By").select_option("team")
        page.get_by_role("button", name="Show").click()
        today_row = page.get_by_role("row", name=re.compile(today().isoformat()[5:]))
        expect(today_row).to_contain_text("design")
        expect(today_row).to_contain_text("$0.03")
        with page.expect_download() as download:
            page.get_by_role("link", name="Download CSV").click()
        csv = Path(download.value.path()).read_text()
        assert csv.splitlines()[0] == "period,team,spent_usd,uncertain_usd,requests"
        assert f"{today().isoformat()},design,0.03,0,1" in csv.splitlines()
        assert (
            len(csv.splitlines())
            == 1 + len([d for d in booked if d[:7] == today().isoformat()[:7]]) + 1
        )
        shot(page, "usage")

        go(page, "Teams")
        page.get_by_role("link", name="Edit budgets of design").click()
        page.get_by_label("Monthly budget (USD)").fill("25")
        page.get_by_role("button", name="Save budgets").click()
        expect(page.get_by_role("status")).to_contain_text("design")
        expect(page.get_by_role("row", name=re.compile("design"))).to_contain_text("of $25.00")
        shot(page, "teams")
        page.goto("/console")
        shot(page, "overview-with-budgets")  # the README's picture

        go(page, "Keys")
        page.get_by_role("link", name="Edit poster studio").click()
        page.get_by_label("Requests a minute").fill("12")
        page.get_by_role("button", name="Save").click()
        expect(page.get_by_role("status")).to_have_text("Saved.")
        expect(page.get_by_label("Requests a minute")).to_have_value("12")
        shot(page, "key")

        page.get_by_role("link", name="Revoke this key…").click()
        expect(page.get_by_role("heading", name="Revoke “poster studio”?")).to_be_visible()
        shot(page, "revoke")
        page.get_by_role("button", name="Revoke key").click()
        expect(page.get_by_role("heading", name=re.compile("poster studio"))).to_contain_text(
            "revoked"
        )
        with pytest.raises(openai.AuthenticationError):
            client.images.generate(model="gpt-image-2-vip", prompt="a lighthouse at dusk")
        client.close()

        # A form sent without its CSRF token is refused, and changes nothing.
        go(page, "Teams")
        page.locator("form.grid-form input[name=csrf]").evaluate("field => field.remove()")
        page.get_by_label("Team", exact=True).fill("intruders")
        page.get_by_role("button", name="Save budgets").click()
        expect(page.get_by_role("alert")).to_contain_text("CSRF token")
        teams = httpx.get(
            console.url + "/admin/teams", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        ).json()["data"]
        assert [t["name"] for t in teams] == ["design"]

        # Signing out ends the session: the old cookie no longer opens a page.
        page.goto("/console")
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        replay = httpx.get(
            console.url + "/console/keys", cookies={"apiyi_console": cookie["value"]}
        )
        assert replay.status_code == 303 and replay.headers["location"] == "/console"


def test_every_page_fits_a_phone_and_loads_nothing_from_elsewhere(
    browser: Browser, console: ProxyProcess
) -> None:
    console.new_key("phone", team="field")
    outside: list[str] = []
    with tab(browser, console.url, viewport=PHONE, is_mobile=True, has_touch=True) as page:
        page.on(
            "request",
            lambda r: None if r.url.startswith(console.url) else outside.append(r.url),
        )
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto("/console")
        assert fits_the_width(page)
        shot(page, "phone-signin")
        sign_in(page)
        for path, name in [
            ("/console", "overview"),
            ("/console/keys", "keys"),
            ("/console/teams", "teams"),
            ("/console/usage", "usage"),
            ("/console/calls", "calls"),
        ]:
            page.goto(path)
            expect(page.get_by_role("heading", level=1)).to_be_visible()
            assert fits_the_width(page), f"{path} is wider than a phone"
            shot(page, f"phone-{name}")
    assert outside == []
    # A CSP violation (an inline script or style the policy refuses) is a console error.
    assert errors == []


def test_a_wrong_token_cannot_sign_in_and_attempts_are_limited(
    browser: Browser, console: ProxyProcess
) -> None:
    with tab(browser, console.url) as page:
        for _ in range(5):
            sign_in(page, "not-the-admin-token-0123456789abcdef")
            expect(page.get_by_role("alert")).to_have_text("That is not the admin token.")
        shot(page, "signin-refused")
        sign_in(page)  # the right token, too late: the address has used its attempts
        expect(page.get_by_role("alert")).to_contain_text("Too many failed sign-ins")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        assert not [c for c in page.context.cookies() if c["name"] == "apiyi_console"]
