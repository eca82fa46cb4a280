"""Helpers for the dashboard tests: a signed-in HTTP client and the CSRF token of a page."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

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
