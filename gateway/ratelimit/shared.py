"""Rate limits shared by several processes: which limiter a gateway runs, and the database-backed one.

With Redis (GATEWAY_REDIS_URL) the windows live there (gateway/ratelimit/redis_backend.py); else, when
several processes share the database (`--workers`, or PostgreSQL), they live in its `rate_windows`
table (gateway/store/sqlite_ratelimit.py, postgres_ratelimit.py); else in memory. Both shared
limiters admit by leases of the per-minute budget (gateway/ratelimit/lease.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.ratelimit.budget import RateBudget
from gateway.ratelimit.lease import LeasedRateLimiter
from gateway.ratelimit.limiter import RateLimit, RateLimiter, StoreErrorPolicy

if TYPE_CHECKING:
    from gateway.settings import Settings


class StoreRateLimiter(LeasedRateLimiter):
    """`RateLimit` over the database's rate windows: exact across processes sharing the database."""

    def __init__(
        self,
        store: RateBudget,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        on_store_error: StoreErrorPolicy = StoreErrorPolicy.OPEN,
        clock: Callable[[], float] | None = None,  # None: the database's clock (tests inject one)
        timeout: float = 5.0,
    ) -> None:
        super().__init__(
            store, requests_per_minute, tokens_per_minute, on_store_error, clock, "rate-limit store", timeout
        )


def make_limiter(settings: Settings, store: RateBudget, *, shared: bool) -> RateLimit:
    """Redis when GATEWAY_REDIS_URL is set; else the database when several processes share it
    (`shared`: more than one worker, or PostgreSQL); else in memory."""
    rl = settings.file.rate_limit
    if rl.requests_per_minute is None and rl.tokens_per_minute is None:
        return RateLimiter(None, None)
    return _limiter(settings, store, shared, rl.requests_per_minute, rl.tokens_per_minute)


PORTAL_KEY = "portal:"  # + the user id (which never holds a colon): apart from the user's request window


def make_portal_limiter(settings: Settings, store: RateBudget, *, shared: bool) -> RateLimit:
    """Billing portal sessions per user and minute (`[rate_limit] portal_sessions_per_minute`), in the
    same backend as the request limits, under the key `PORTAL_KEY + user id`: so across processes too."""
    return _limiter(settings, store, shared, settings.file.rate_limit.portal_sessions_per_minute, None)


def _limiter(settings: Settings, store: RateBudget, shared: bool, rpm: int | None, tpm: int | None) -> RateLimit:
    """The limiter of these limits in the backend `make_limiter` says."""
    on_store_error = settings.file.rate_limit.on_store_error
    if settings.redis_url:
        from gateway.ratelimit.redis_backend import RedisRateLimiter

        return RedisRateLimiter(settings.redis_url, rpm, tpm, on_store_error=on_store_error)
    if shared:
        return StoreRateLimiter(store, rpm, tpm, on_store_error, timeout=settings.store_timeout_seconds)
    return RateLimiter(rpm, tpm)


__all__ = ["PORTAL_KEY", "StoreRateLimiter", "make_limiter", "make_portal_limiter"]
