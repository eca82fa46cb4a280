"""Renders the dashboard's Jinja2 templates (`gateway/templates/dashboard/`) into HTML responses."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import jinja2
from starlette.responses import HTMLResponse

# The pages are plain HTML with inline CSS and no scripts; nothing may frame them.
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self';"
        " frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


def _when(dt: datetime | None) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if dt else "never"


def _num(n: float | int | None) -> str:
    return "-" if n is None else f"{n:,}"


_env = jinja2.Environment(
    loader=jinja2.PackageLoader("gateway", "templates/dashboard"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["when"] = _when
_env.filters["num"] = _num


def page(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _env.get_template(template).render(**context)
    return HTMLResponse(html, status, headers=SECURITY_HEADERS)
