"""User-facing billing endpoints: usage status for a healthbar, and the Polar portal link."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway.http_api import StoreUnavailable, api_error, from_store
from gateway.keys import Identity
from gateway.meters import ALL_METERS
from gateway.polar.client import CustomerNotFound, PolarBillingError, SessionRefused
from gateway.quota import meter_status, overall_status
from gateway.ratelimit.shared import PORTAL_KEY
from gateway.services import Services
from gateway.status_tokens import TOKEN_PREFIX, StatusTokens
from gateway.timeutil import iso

log = logging.getLogger("gateway.billing")

# Refusal reasons of the portal's 429 (metrics, the dashboard), apart from the provider requests' own.
PORTAL_RATE_LIMITED = "portal_rate_limited"  # the user's portal_sessions_per_minute are spent
PORTAL_UNAVAILABLE = "portal_unavailable"  # the shared limit could not be checked (on_store_error = "closed")


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def bearer_or_api_key(request: Request) -> str | None:
    return bearer(request) or request.headers.get("x-api-key") or request.headers.get("x-goog-api-key")


async def authenticate(s: Services, request: Request, tokens: StatusTokens) -> Identity | None:
    """A gateway key, or a status token (`Authorization: Bearer pgs_...` only: these routes alone take one)."""
    token = bearer(request)
    if token is not None and token.startswith(TOKEN_PREFIX):
        user_id = tokens.verify(token)
        return Identity(key_id="", user_id=user_id) if user_id is not None else None
    return await s.keys.authenticate(bearer_or_api_key(request))


def unauthorized(request: Request) -> JSONResponse:
    token = bearer(request)
    if token is not None and token.startswith(TOKEN_PREFIX):
        return api_error(401, "invalid or expired status token")
    return api_error(401, "invalid or revoked gateway key")


def status_endpoint(s: Services, tokens: StatusTokens) -> Callable[[Request], Awaitable[JSONResponse]]:
    async def billing_status(request: Request) -> JSONResponse:
        wait = s.settings.store_timeout_seconds
        try:
            ident = await from_store(authenticate(s, request, tokens), wait, "billing status: checking a key")
            if ident is None:
                return unauthorized(request)
            uq = await from_store(s.ledger.snapshot(ident.user_id), wait, f"billing status: usage of {ident.user_id}")
        except StoreUnavailable as exc:
            return exc.response
        cfg = s.settings.file.status
        meters = [meter_status(name, uq.meter(name), cfg.warning, cfg.critical) for name in ALL_METERS]
        return JSONResponse(
            {
                "userId": ident.user_id,
                "status": overall_status(meters),
                "meters": [
                    {
                        "name": m.name,
                        "consumed": m.consumed,
                        "reserved": m.reserved,
                        "credited": m.credited,
                        "remaining": m.remaining,
                        "percentUsed": m.percent_used,
                        "status": m.status,
                    }
                    for m in meters
                ],
                "period": {"start": iso(uq.period_start), "end": iso(uq.period_end)},
                "limits": {
                    "source": uq.source,
                    "updatedAt": iso(uq.limits_updated_at) if uq.limits_updated_at else None,
                },
            }
        )

    return billing_status


def _host(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:  # e.g. an unclosed "[" (an IPv6 literal)
        return None


def portal_endpoint(s: Services, tokens: StatusTokens) -> Callable[[Request], Awaitable[JSONResponse]]:
    async def billing_portal(request: Request) -> JSONResponse:
        wait = s.settings.store_timeout_seconds
        try:
            ident = await from_store(authenticate(s, request, tokens), wait, "billing portal: checking a key")
        except StoreUnavailable as exc:
            return exc.response
        if ident is None:
            return unauthorized(request)
        if s.polar is None:
            return api_error(503, "billing portal unavailable: Polar is not configured")
        return_url = request.query_params.get("return_url")
        if return_url is not None and (not return_url.startswith(("https://", "http://")) or not _host(return_url)):
            return api_error(400, "return_url must be an http(s) URL")
        # Each session is a call on the organisation's Polar token, whose rate limit the usage sync
        # shares: a user's budget is spent before Polar is asked, and a refusal never asks it.
        limited, _ = await s.portal_limiter.acquire(PORTAL_KEY + ident.user_id, 0)
        if limited is not None:
            if limited.reason == "unavailable":
                reason, message = (
                    PORTAL_UNAVAILABLE,
                    "billing portal links cannot be handed out right now: try again later",
                )
            else:
                reason, message = PORTAL_RATE_LIMITED, "too many billing portal sessions: try again later"
            s.metrics.refused(429, reason)
            s.refusals.count(429, reason)
            return api_error(429, message, {"retry-after": str(limited.retry_after)})
        try:
            url = await s.polar.portal_url(ident.user_id, return_url)
        except CustomerNotFound:
            return api_error(404, "no Polar customer exists for this user yet")
        except SessionRefused as exc:
            return api_error(400, str(exc))
        except PolarBillingError as exc:
            log.warning("portal session for %s failed: %s", ident.user_id, type(exc).__name__)
            return api_error(503, "Polar is unreachable right now")
        return JSONResponse({"url": url})

    return billing_portal
