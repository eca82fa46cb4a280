"""Dashboard sign-in: the admin token, exchanged for a signed session cookie, and CSRF tokens.

The cookie holds an expiry and a random nonce, signed with HMAC-SHA256 under a key derived from
GATEWAY_ADMIN_TOKEN, so there is no server-side session state and changing the token signs every
session out. Each session's CSRF token is derived from its nonce; state-changing forms carry it
in a hidden field (and the cookie is SameSite=Strict besides).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.http_api import BodyRefused, read_body
from gateway.signing import derive_key, sign, signed

COOKIE = "gw_admin"
COOKIE_PATH = "/admin"
SIGNIN_PATH = "/admin/signin"
SESSION_SECONDS = 8 * 3600
CSRF_FIELD = "csrf"
_KEY_LABEL = b"polar-gateway dashboard session v1"  # a distinct key: the token itself is never the MAC key
MAX_FORM_BYTES = 16 * 1024

Endpoint = Callable[[Request], Awaitable[Response]]


def _mac(key: bytes, label: str, payload: str) -> str:
    return sign(key, f"{label}:{payload}")


@dataclass(frozen=True, slots=True)
class Session:
    expires_at: int  # unix seconds
    csrf: str


class SessionSigner:
    """Issues and checks session cookies and CSRF tokens; disabled without an admin token."""

    def __init__(self, admin_token: str) -> None:
        self._key = derive_key(admin_token, _KEY_LABEL) if admin_token else b""

    @property
    def enabled(self) -> bool:
        return bool(self._key)

    def issue(self, now: float | None = None, ttl: int = SESSION_SECONDS) -> str:
        """A cookie value: `<expiry>.<nonce>.<mac>`."""
        if not self.enabled:
            raise RuntimeError("no admin token: sessions are disabled")
        payload = f"{int((time.time() if now is None else now) + ttl)}.{secrets.token_urlsafe(16)}"
        return f"{payload}.{_mac(self._key, 'session', payload)}"

    def verify(self, value: str | None, now: float | None = None) -> Session | None:
        """The session of a cookie value, or None if it is missing, forged, malformed or expired."""
        if not self.enabled or not value:
            return None
        expires, _, rest = value.partition(".")
        nonce, _, mac = rest.partition(".")
        payload = f"{expires}.{nonce}"
        if not signed(self._key, f"session:{payload}", mac):
            return None
        if not expires.isdigit() or int(expires) <= (time.time() if now is None else now):
            return None
        return Session(int(expires), _mac(self._key, "csrf", nonce))

    def session_of(self, request: Request) -> Session | None:
        return self.verify(request.cookies.get(COOKIE))

    def guard(self, endpoint: Endpoint) -> Endpoint:
        """`endpoint` for signed-in admins only; anyone else is sent to the sign-in page. (Only the
        cookie counts: neither the bearer admin token nor a user key opens a page.)"""

        async def guarded(request: Request) -> Response:
            if self.session_of(request) is None:
                return to_signin()
            return await endpoint(request)

        return guarded

    def session_or(self, guard: Callable[[Endpoint], Endpoint]) -> Callable[[Endpoint], Endpoint]:
        """A guard that lets signed-in admins through and leaves everyone else to `guard` (for pages
        that the admin API's bearer token opens too)."""

        def wrap(endpoint: Endpoint) -> Endpoint:
            otherwise = guard(endpoint)

            async def guarded(request: Request) -> Response:
                if self.session_of(request) is not None:
                    return await endpoint(request)
                return await otherwise(request)

            return guarded

        return wrap


def to_signin() -> Response:
    return RedirectResponse(SIGNIN_PATH, 303)


def session_cookie(value: str, *, secure: bool, max_age: int = SESSION_SECONDS) -> str:
    """A Set-Cookie value (written out: Starlette's spells the attribute `SameSite=strict`)."""
    parts = [f"{COOKIE}={value}", f"Path={COOKIE_PATH}", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def is_https(request: Request, always: bool = False) -> bool:
    """Whether the browser reached the gateway over https, so the session cookie gets `Secure`:
    uvicorn serving TLS itself, or a TLS-terminating proxy saying so (`X-Forwarded-Proto`, RFC 7239
    `Forwarded`; the first proxy's value, the one the browser used), or `always` (GATEWAY_SECURE_COOKIE,
    for a proxy that says nothing). The headers are taken from anyone: Secure only restricts where the
    cookie goes, so a client forging them can only keep its own session from working over http."""
    if always or request.url.scheme == "https":
        return True
    headers = request.headers
    proto = headers.get("x-forwarded-proto")
    if proto is not None:
        return proto.split(",")[0].strip().lower() == "https"
    forwarded = headers.get("forwarded")
    if forwarded is not None:
        for pair in forwarded.split(",")[0].split(";"):
            name, _, value = pair.partition("=")
            if name.strip().lower() == "proto":
                return value.strip().strip('"').lower() == "https"
    return False


class FormRefused(Exception):
    pass


async def read_form(request: Request) -> dict[str, str]:
    """A small urlencoded form body (the first value of each field)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise FormRefused("expected a form")
    try:
        body = await read_body(request, MAX_FORM_BYTES)
    except BodyRefused as exc:
        raise FormRefused("form too large or cut short") from exc
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=False, max_num_fields=20)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormRefused("malformed form") from exc
    return {k: v[0] for k, v in fields.items()}


def csrf_matches(session: Session, form: dict[str, str]) -> bool:
    return hmac.compare_digest(form.get(CSRF_FIELD, "").encode(), session.csrf.encode())
