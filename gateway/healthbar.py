"""The healthbar web component (`/static/healthbar.js`) and its demo page (`/admin/healthbar-demo`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from importlib import resources

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from gateway.admin import Endpoint
from gateway.http_api import api_error
from gateway.keys import InvalidUserId
from gateway.status_tokens import DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS, MIN_TTL_SECONDS, StatusTokens
from gateway.timeutil import iso

SCRIPT_PATH = "/static/healthbar.js"
# Browsers revalidate after an hour (a cheap 304 by ETag), so an upgraded gateway's script reaches them soon.
_CACHE_CONTROL = "public, max-age=3600"

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("gateway", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
)


def script_route(path: str = SCRIPT_PATH) -> Route:
    """The web component, read once from the package; ETag revalidation answers 304 without a body."""
    body = (resources.files("gateway") / "static" / "healthbar.js").read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {"cache-control": _CACHE_CONTROL, "etag": etag}

    async def healthbar_js(request: Request) -> Response:
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="text/javascript; charset=utf-8", headers=headers)

    return Route(path, healthbar_js, methods=["GET", "HEAD"])


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # ASCII digits only, and no more of them than the bound has: int() takes other digits ("²" raises,
    # "٣" is 3) and refuses over 4300 digits, each with a message of its own.
    digits = raw.lstrip("0") or "0"
    if not (raw.isascii() and raw.isdigit() and len(digits) <= len(str(high))) or not low <= int(digits) <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}")
    return int(digits)


def demo_route(tokens: StatusTokens, guard: Callable[[Endpoint], Endpoint]) -> Route:
    """`GET /admin/healthbar-demo?user_id=...[&ttl_seconds=900][&refresh=30]`: the widget for one user.

    `guard` decides who may see it (the app: a dashboard session or the admin token); the page
    mints a status token itself."""

    async def demo(request: Request) -> Response:
        if not tokens.enabled:
            return api_error(503, "status tokens are disabled: set GATEWAY_STATUS_TOKEN_SECRET or GATEWAY_ADMIN_TOKEN")
        user_id = request.query_params.get("user_id")
        if not user_id:
            return api_error(400, "user_id query parameter required")
        try:
            ttl = _int_param(request, "ttl_seconds", DEFAULT_TTL_SECONDS, MIN_TTL_SECONDS, MAX_TTL_SECONDS)
            refresh = _int_param(request, "refresh", 30, 1, 3600)
            issued = tokens.issue(user_id, ttl)
        except (InvalidUserId, ValueError) as exc:
            return api_error(400, str(exc))
        base = str(request.base_url).rstrip("/")
        html = _templates.get_template("healthbar_demo.html").render(
            user_id=user_id,
            token=issued.token,
            expires_at=iso(issued.expires_at),
            refresh=refresh,
            gateway_url=base,
            script_url=base + SCRIPT_PATH,
        )
        # The page holds a live token: keep it out of caches.
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    return Route("/admin/healthbar-demo", guard(demo), methods=["GET"])
