"""The <gateway-healthbar> widget in a real browser (Debian's chromium driven by Playwright).

Playwright never downloads a browser here: it launches the system `chromium`. Every request the
page makes outside the gateway is answered by the test (the fake Polar portal page) or refused,
so nothing reaches the internet. Screenshots of each state go to test-artifacts/.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anthropic
import httpx
import pytest

from gateway.settings import FileConfig, RateLimitConfig, StatusConfig
from tests.conftest import ADMIN_TOKEN, ROOT, Gateway
from tests.fakes.polar import FakePolar

playwright_sync = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install -y chromium")

ARTIFACTS = ROOT / "test-artifacts"
PORTAL = "https://sandbox.polar.sh/"
MSG = [{"role": "user", "content": "Hello"}]
# After two requests: claude input 2 x 12 of 150 (16%: warning at these thresholds), output 2 x 9 of 20
# (90%: critical), images 0 of 100 (ok); the other meters are unmetered (no bar).
FILE = FileConfig(
    plan={"claude_input_tokens": 150, "claude_output_tokens": 20, "gemini_images": 100},
    rate_limit=RateLimitConfig(requests_per_minute=None, tokens_per_minute=None),
    status=StatusConfig(warning=0.1, critical=0.5),
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 720, "height": 560})

    def offline(route: Any) -> None:
        url = route.request.url
        if url.startswith("http://127.0.0.1:"):
            route.continue_()
        elif url.startswith(PORTAL):
            route.fulfill(status=200, content_type="text/html", body="<h1>Fake Polar customer portal</h1>")
        else:
            route.abort()

    context.route("**/*", offline)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert errors == [], errors  # the widget threw no uncaught error


def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("gateway-healthbar").screenshot(path=str(ARTIFACTS / f"healthbar-{name}.png"))


def open_demo(page: Any, gw: Gateway, user_id: str, **params: str) -> None:
    """The demo page is admin-only: the admin token goes on that one request, never on the widget's."""

    def with_admin(route: Any) -> None:
        route.continue_(headers={**route.request.headers, "authorization": f"Bearer {ADMIN_TOKEN}"})

    page.route("**/admin/healthbar-demo*", with_admin)
    query = "&".join(f"{k}={v}" for k, v in {"user_id": user_id, **params}.items())
    page.goto(f"{gw.url}/admin/healthbar-demo?{query}")


class AppSite:
    """Another origin (another loopback port, so no local-network permission is involved) serving pages."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = site.pages.get(self.path, "").encode()
                self.send_response(200 if body else 404)
                self.send_header("content-type", "text/html; charset=utf-8")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def app_site() -> Iterator[AppSite]:
    site = AppSite()
    site.thread.start()
    yield site
    site.server.shutdown()
    site.server.server_close()


@pytest.fixture
def used(make_gateway: Callable[..., Gateway], fake: FakePolar, app_site: AppSite) -> Gateway:
    """A gateway with a plan that limits the claude meters, and two requests by alice through the SDK."""
    gw = make_gateway(file=FILE, polar_access_token=fake.token, polar_base_url=fake.url, cors_origins=app_site.origin)
    key = gw.issue_key("alice")
    client = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
    for _ in range(2):
        client.messages.create(model="claude-sonnet-4-6", max_tokens=9, messages=MSG)  # type: ignore[arg-type]
    gw.wait_recorded("alice", 2)
    fake.add_customer("alice")
    return gw


def expect_bars_match_the_api(page: Any, gw: Gateway) -> None:
    status = httpx.get(f"{gw.url}/api/billing/status", headers={"authorization": f"Bearer {gw.status_token('alice')}"})
    metered = [m for m in status.json()["meters"] if m["credited"] is not None]
    assert {m["name"]: m["status"] for m in metered} == {
        "claude_input_tokens": "warning",
        "claude_output_tokens": "critical",
        "gemini_images": "ok",
    }
    rows = page.locator("gateway-healthbar .meter")
    rows.first.wait_for()
    assert rows.count() == len(metered)
    colours = set()
    for m in metered:
        row = page.locator(f'gateway-healthbar .meter[data-meter="{m["name"]}"]')
        assert row.get_attribute("data-status") == m["status"]
        assert row.locator(".amount").inner_text() == f"{m['consumed']} / {m['credited']} ({m['percentUsed']:g}%)"
        fill = row.locator(".fill")
        assert fill.evaluate("e => e.style.width") == f"{m['percentUsed']:g}%"
        colours.add(fill.evaluate("e => getComputedStyle(e).backgroundColor"))
    assert len(colours) == 3  # one colour per status
    badge = page.locator("gateway-healthbar .badge")
    assert badge.inner_text().lower() == status.json()["status"] == "critical"
    assert page.locator("gateway-healthbar .period").inner_text().startswith("Resets ")


def test_widget_shows_the_status_bars(page: Any, used: Gateway) -> None:
    open_demo(page, used, "alice")
    expect_bars_match_the_api(page, used)
    assert page.locator("gateway-healthbar .message").inner_text() == ""
    screenshot(page, "status")


def test_manage_billing_opens_the_polar_portal(page: Any, used: Gateway, fake: FakePolar) -> None:
    open_demo(page, used, "alice")
    page.locator("gateway-healthbar .meter").first.wait_for()
    with page.expect_popup() as popup_info:
        page.locator("gateway-healthbar button").click()
    popup = popup_info.value
    popup.wait_for_load_state()
    assert popup.url == fake.sessions[-1]["customer_portal_url"]
    assert popup.locator("h1").inner_text() == "Fake Polar customer portal"
    assert fake.sessions[-1]["return_url"] == page.url  # back to the page the user came from
    screenshot(page, "portal")


def test_an_expired_token_says_so(page: Any, used: Gateway) -> None:
    open_demo(page, used, "alice", ttl_seconds="1", refresh="1")
    expired = page.locator("gateway-healthbar .message", has_text="expired")
    expired.wait_for(timeout=10_000)
    assert expired.inner_text() == "This usage link has expired. Reload the page to see your current usage."
    assert page.locator("gateway-healthbar button").is_disabled()
    screenshot(page, "expired")


def test_widget_on_another_origin_works_through_cors(
    page: Any, used: Gateway, make_gateway: Any, app_site: AppSite
) -> None:
    token = used.status_token("alice")
    no_cors = make_gateway(file=FILE)
    for path, gw in (("/with-cors", used), ("/without-cors", no_cors)):
        app_site.pages[path] = (
            f'<script type="module" src="{used.url}/static/healthbar.js"></script>'
            f'<gateway-healthbar gateway="{gw.url}" token="{token}"></gateway-healthbar>'
        )
    page.goto(f"{app_site.origin}/with-cors")
    expect_bars_match_the_api(page, used)
    screenshot(page, "cross-origin")
    # A gateway that does not list the origin: the browser withholds its answer from the widget.
    page.goto(f"{app_site.origin}/without-cors")
    page.locator("gateway-healthbar .message", has_text="unavailable").wait_for(timeout=10_000)
    assert page.locator("gateway-healthbar .meter").count() == 0


# Every fetch the page makes, noted once the code awaiting it has run (a task queued after its answer).
SETTLED_FETCHES = """
window.__settled = [];
const fetchOnce = window.fetch.bind(window);
window.fetch = async (url, init) => {
  const response = await fetchOnce(url, init);
  setTimeout(() => window.__settled.push(init.headers.authorization), 0);
  return response;
};
"""


def test_an_answer_for_a_replaced_token_changes_nothing(page: Any, used: Gateway) -> None:
    """An answer that arrives after the token was replaced is the old token's: a late 401 for it must not
    mark the new token expired (which also ended the refreshes)."""
    page.add_init_script(SETTLED_FETCHES)
    held: list[Any] = []
    page.route(
        "**/api/billing/status",
        lambda route: held.append(route) if "pgs_old" in str(route.request.headers) else route.continue_(),
    )
    open_demo(page, used, "alice", refresh="3600")
    page.locator("gateway-healthbar .meter").first.wait_for()
    with page.expect_request(lambda r: "pgs_old" in r.headers.get("authorization", "")):
        page.evaluate("document.querySelector('gateway-healthbar').setAttribute('token', 'pgs_old')")
    fresh = used.status_token("alice")
    page.evaluate(f"document.querySelector('gateway-healthbar').setAttribute('token', '{fresh}')")
    page.wait_for_function(f"window.__settled.includes('Bearer {fresh}')")
    held[0].continue_()  # the gateway refuses the old token: 401
    page.wait_for_function("window.__settled.includes('Bearer pgs_old')")
    assert page.locator("gateway-healthbar .message").inner_text() == ""
    assert not page.locator("gateway-healthbar button").is_disabled()
    expect_bars_match_the_api(page, used)
