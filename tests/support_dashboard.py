"""Helpers for the dashboard tests: a signed-in HTTP client, the CSRF token of a page, and the browser."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from playwright.sync_api import Page

from tests.conftest import ADMIN_TOKEN, Gateway

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "no CSRF field on the page"
    return found.group(1)


@contextmanager
def signed_in(gw: Gateway) -> Iterator[httpx.Client]:
    """A client holding a dashboard session (not following redirects, so tests see each 303)."""
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        resp = client.post("/admin/signin", data={"token": ADMIN_TOKEN})
        assert resp.status_code == 303 and resp.headers["location"] == "/admin", resp.text
        assert "gw_admin" in client.cookies
        yield client


ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium")  # Debian's, driven by Playwright (no browser download)


def sign_in_browser(page: Page, gw: Gateway) -> None:
    page.goto(f"{gw.url}/admin")
    page.wait_for_url(f"{gw.url}/admin/signin")
    page.fill("input[name=token]", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{gw.url}/admin")


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)
