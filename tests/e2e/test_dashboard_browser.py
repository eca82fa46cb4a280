"""The admin dashboard in a real browser (Playwright driving Chromium): sign in, watch a user's
bars move, revoke a key, re-queue a failed event. Screenshots of each page go to test-artifacts/."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import anthropic
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import Gateway, wait_until
from tests.fakes.polar import FakePolar
from tests.support_dashboard import CHROMIUM, screenshot, sign_in_browser

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install -y chromium")
MSG = [{"role": "user", "content": "Hello"}]


def ask(gw: Gateway, key: str) -> None:
    client = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
    client.messages.create(model="claude-sonnet-4-6", max_tokens=9, messages=MSG)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    yield context.new_page()
    context.close()


def test_sign_in_and_see_a_users_bars_move(page: Page, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(plan={"claude_output_tokens": 36}, refusals_flush_seconds=0.05)
    key = gw.issue_key("fay")
    page.goto(f"{gw.url}/admin/users/fay")
    page.wait_for_url(f"{gw.url}/admin/signin")  # no session: sent to sign in
    page.fill("input[name=token]", "not-the-token")
    page.click("button[type=submit]")
    expect(page.locator("#signin-error")).to_have_text("Wrong admin token.")
    screenshot(page, "signin")
    sign_in_browser(page, gw)
    [cookie] = page.context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (
        "gw_admin",
        True,
        "Strict",
        "/admin",
    )

    page.click("text=Users")
    page.fill("input[name=q]", "fa")
    page.click("text=Search")
    screenshot(page, "users")
    page.click("#users >> text=fay")
    page.wait_for_url(f"{gw.url}/admin/users/fay")
    meter = page.locator("#meter-claude_output_tokens")
    expect(meter).to_have_attribute("data-consumed", "0")
    assert page.locator("#meter-claude_output_tokens .consumed").get_attribute("style") == "width: 0.0%"

    ask(gw, key)
    gw.wait_recorded("fay")
    page.reload()
    expect(meter).to_have_attribute("data-consumed", "9")
    assert page.locator("#meter-claude_output_tokens .consumed").get_attribute("style") == "width: 25.0%"
    ask(gw, key)
    ask(gw, key)
    gw.wait_recorded("fay", 3)
    page.reload()
    expect(meter).to_have_attribute("data-status", "warning")  # 27 of 36
    assert page.locator("#meter-claude_output_tokens .consumed").get_attribute("style") == "width: 75.0%"
    expect(page.locator("#requests tr")).to_have_count(4)  # the header and three requests
    screenshot(page, "user")

    # refused: over quota (9 left, up to 16 asked), then a wrong key
    with pytest.raises(anthropic.PaymentRequiredError):
        anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0).messages.create(
            model="claude-sonnet-4-6",
            max_tokens=16,
            messages=MSG,  # type: ignore[arg-type]
        )
    with pytest.raises(anthropic.AuthenticationError):
        ask(gw, "pgw_wrong")
    wait_until(lambda: gw.query("SELECT status, count FROM refusals ORDER BY status") == [(401, 1), (402, 1)])

    page.click("text=Overview")
    expect(page.locator("#totals-24h")).to_contain_text("ok")
    expect(page.locator("#chart-requests-hourly rect.ok")).to_have_count(1)
    for chart in ("#chart-refusals-hourly", "#chart-refusals-daily"):
        expect(page.locator(f"{chart} rect.s401")).to_have_count(1)
        expect(page.locator(f"{chart} rect.s402")).to_have_count(1)
        expect(page.locator(f"{chart} rect.s429")).to_have_count(0)
        expect(page.locator(f"{chart} rect.s402 title")).to_have_text(re.compile(r": 1 refused with 402$"))
    box = page.locator("#chart-refusals-hourly rect.s402").bounding_box()
    assert box is not None and box["width"] > 0 and box["height"] > 0  # drawn, not just in the markup
    expect(page.locator("#refusals-24h tr")).to_have_count(3)  # the header, 401 and 402
    expect(page.locator("#refusals-24h")).to_contain_text("quota")
    screenshot(page, "overview")
    page.click("text=Sign out")
    page.wait_for_url(f"{gw.url}/admin/signin")
    page.goto(f"{gw.url}/admin")
    page.wait_for_url(f"{gw.url}/admin/signin")


def test_create_and_revoke_a_key_from_the_page(page: Page, make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway()
    old = gw.issue_key("gus")
    sign_in_browser(page, gw)
    page.goto(f"{gw.url}/admin/users/gus")
    page.fill("#create-key input[name=name]", "ci")
    page.click("text=Create a key")
    new = page.locator("#new-key code").inner_text()
    assert new.startswith("pgw_")
    ask(gw, new)
    ask(gw, old)
    page.goto(f"{gw.url}/admin/users/gus")
    rows = page.locator("#keys tr", has_text="active")
    expect(rows).to_have_count(2)
    # (its row by the key's shown prefix: a name like "ci" can also occur inside another key's prefix)
    page.locator("#keys tr", has_text=new[:12]).locator("text=Revoke").click()
    expect(page.locator("#revoked")).to_contain_text("revoked")
    expect(rows).to_have_count(1)
    with pytest.raises(anthropic.AuthenticationError):
        ask(gw, new)
    ask(gw, old)  # the other key still works
    screenshot(page, "user-revoked")


def test_requeue_a_failed_event_and_see_it_reach_polar(page: Page, make_gateway: Callable[..., Gateway]) -> None:
    with FakePolar() as polar:
        gw = make_gateway(
            polar_access_token=polar.token, polar_base_url=polar.url, sync_max_attempts=1, sync_interval_seconds=0.2
        )
        key = gw.issue_key("hal")
        polar.reject_when(lambda e: "customer hal is unknown")
        ask(gw, key)
        wait_until(lambda: gw.query("SELECT sync_state FROM requests") == [("failed",)], timeout=10)
        sign_in_browser(page, gw)
        page.click("text=Sync")
        expect(page.locator("#failed tr")).to_have_count(3)  # the header and two events
        expect(page.locator("#failed")).to_contain_text("customer hal is unknown")
        screenshot(page, "sync")
        polar.reject_when(None)
        page.click("text=Re-queue all failed events")
        expect(page.locator("#requeued")).to_have_text("Re-queued 2 events.")
        wait_until(lambda: len(polar.events) == 2, timeout=10)
        assert polar.total("claude_output_tokens", "hal") == 9
        page.reload()
        expect(page.locator("#failed")).to_contain_text("No failed events.")
        expect(page.locator("#backlog")).to_have_text(re.compile(r"^[01]$"))
