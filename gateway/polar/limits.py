"""Background refresh of cached Polar limits, so the request path never waits on Polar.

Webhooks keep limits current; this loop is the safety net for missed or failed deliveries
and for users who have no cached limits yet. Errors are logged and retried next round.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Protocol

from gateway.polar.client import PolarBillingError, RetryableError, valid_user_id
from gateway.store.base import CustomerLimits, LimitsStore
from gateway.timeutil import utcnow

log = logging.getLogger("gateway.limits")


class LimitsSource(Protocol):
    async def customer_limits(self, user_id: str) -> CustomerLimits | None: ...


class LimitsRefresher:
    def __init__(
        self,
        store: LimitsStore,
        polar: LimitsSource,
        max_age_seconds: float,
        on_limits_changed: Callable[[str], Awaitable[None]],
        *,
        interval: float | None = None,
        per_round: int = 50,
    ) -> None:
        self.store = store
        self.polar = polar
        self.max_age_seconds = max_age_seconds
        self.on_limits_changed = on_limits_changed
        # Polar allows 100 req/min in sandbox: a bounded number of users per round.
        self.interval = interval if interval is not None else max(1.0, min(60.0, max_age_seconds / 4))
        self.per_round = per_round
        self._untold: set[str] = set()  # limits stored, the change not announced yet

    async def users_to_refresh(self) -> list[str]:
        """Users whose cached limits are older than max_age, then known users with none cached yet."""
        older_than = utcnow() - timedelta(seconds=self.max_age_seconds)
        users = list(await self.store.stale_limit_users(older_than, self.per_round))
        if len(users) < self.per_round:
            for user_id in await self.store.known_users():
                if len(users) >= self.per_round:
                    break
                if user_id not in users and await self.store.get_limits(user_id) is None:
                    users.append(user_id)
        return [u for u in users if valid_user_id(u)]

    async def refresh_once(self) -> int:
        """One round; returns how many users' limits were stored. Stops early if Polar is unavailable."""
        stored = 0
        for user_id in list(self._untold):  # stored by an earlier round, but telling them failed
            await self.on_limits_changed(user_id)
            self._untold.discard(user_id)
        for user_id in await self.users_to_refresh():
            asked_at = utcnow()
            try:
                limits = await self.polar.customer_limits(user_id)
            except RetryableError as exc:
                log.warning("limits refresh paused: %s", exc)
                break
            except PolarBillingError as exc:
                log.warning("limits refresh for one user failed: %s", exc)
                continue
            if limits is None:
                # Not a Polar customer (yet): cache "no Polar limits" so the plan applies and we
                # don't ask again before max_age.
                # (snapshot as of the question: a change made while it was answered is newer)
                limits = CustomerLimits(user_id, {}, None, None, snapshot_at=asked_at, updated_at=utcnow())
            if await self.store.put_limits(limits):
                stored += 1
                self._untold.add(user_id)
                await self.on_limits_changed(user_id)
                self._untold.discard(user_id)
        return stored

    async def run_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.refresh_once()
            except Exception:
                log.exception("limits refresh round failed; retrying next round")
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
            except TimeoutError:
                pass
