"""Status tokens: short-lived, read-only bearer tokens for a user's billing status and portal link.

A token is `pgs_<payload>.<mac>`: the payload is base64url of `<expiry unix seconds>:<user id>`, the
mac is base64url of HMAC-SHA256 over the payload text. Nothing is stored: a token is valid while its
mac checks and its expiry is in the future. The `pgs_` prefix keeps it apart from gateway keys
(`pgw_`), so the provider routes never take one; only `/api/billing/status` and `/api/billing/portal`
do. The signing secret is `GATEWAY_STATUS_TOKEN_SECRET`, else one derived from `GATEWAY_ADMIN_TOKEN`
under its own label (so the admin token itself never signs anything).
"""

from __future__ import annotations

import binascii
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin import Endpoint
from gateway.http_api import BodyRefused, api_error, read_json
from gateway.keys import InvalidUserId, check_user_id
from gateway.signing import b64, derive_key, sign, signed, unb64
from gateway.timeutil import iso

TOKEN_PREFIX = "pgs_"
DEFAULT_TTL_SECONDS = 900
MIN_TTL_SECONDS = 1
MAX_TTL_SECONDS = 24 * 3600
_DERIVE_LABEL = b"polar-gateway/status-token/v1"
_MAX_TOKEN_CHARS = 400  # a 128-character user id makes a token of about 240


def signing_key(secret: str, admin_token: str) -> bytes | None:
    """The HMAC key: the dedicated secret, else one derived from the admin token; None when neither is set."""
    if secret:
        return hashlib.sha256(_DERIVE_LABEL + b"\0" + secret.encode()).digest()
    if admin_token:
        return derive_key(admin_token, _DERIVE_LABEL)
    return None


@dataclass(frozen=True, slots=True)
class StatusToken:
    token: str
    user_id: str
    expires_at: datetime


class StatusTokens:
    """Issues and verifies status tokens; `clock` (unix seconds) is injectable for tests."""

    def __init__(self, key: bytes | None, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def issue(self, user_id: str, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> StatusToken:
        if self._key is None:
            raise RuntimeError("status tokens are disabled: no signing secret")
        check_user_id(user_id)
        if not MIN_TTL_SECONDS <= ttl_seconds <= MAX_TTL_SECONDS:
            raise ValueError(f"ttl_seconds must be {MIN_TTL_SECONDS}..{MAX_TTL_SECONDS}")
        expires = math.ceil(self._clock() + ttl_seconds)
        payload = b64(f"{expires}:{user_id}".encode())
        return StatusToken(
            f"{TOKEN_PREFIX}{payload}.{sign(self._key, payload)}", user_id, datetime.fromtimestamp(expires, UTC)
        )

    def verify(self, token: str | None) -> str | None:
        """The user id a valid, unexpired token was issued for; None for anything else."""
        if self._key is None or not token or not token.startswith(TOKEN_PREFIX) or len(token) > _MAX_TOKEN_CHARS:
            return None
        payload, dot, mac = token[len(TOKEN_PREFIX) :].rpartition(".")
        # The mac covers the payload's text, so no other spelling of the same bytes passes.
        if not dot or not signed(self._key, payload, mac):
            return None
        try:
            expires_text, _, user_id = unb64(payload).decode().partition(":")
            expires = int(expires_text)
            check_user_id(user_id)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        return user_id if self._clock() < expires else None


def _body_error() -> Response:
    return api_error(400, 'body must be {"user_id": "...", "ttl_seconds": 900}')


def status_token_route(tokens: StatusTokens, guard: Callable[[Endpoint], Endpoint]) -> Route:
    """`POST /admin/status-tokens {"user_id", "ttl_seconds"}` -> `{"token", "expires_at"}` (201)."""

    async def create(request: Request) -> Response:
        if not tokens.enabled:
            return api_error(503, "status tokens are disabled: set GATEWAY_STATUS_TOKEN_SECRET or GATEWAY_ADMIN_TOKEN")
        try:
            data = await read_json(request)
        except BodyRefused as exc:
            return exc.response
        if not isinstance(data, dict) or not isinstance(data.get("user_id"), str):
            return _body_error()
        ttl = data.get("ttl_seconds", DEFAULT_TTL_SECONDS)
        if isinstance(ttl, float) and ttl.is_integer():  # JSON has one number type: 60.0 is the integer 60
            ttl = int(ttl)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not MIN_TTL_SECONDS <= ttl <= MAX_TTL_SECONDS:
            return api_error(400, f"ttl_seconds must be an integer from {MIN_TTL_SECONDS} to {MAX_TTL_SECONDS}")
        try:
            issued = tokens.issue(data["user_id"], ttl)
        except InvalidUserId as exc:
            return api_error(400, str(exc))
        return JSONResponse(
            {"token": issued.token, "user_id": issued.user_id, "expires_at": iso(issued.expires_at)}, 201
        )

    return Route("/admin/status-tokens", guard(create), methods=["POST"])
