"""The gateway's runtime dependencies, built once by the app factory and passed explicitly."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field

import aiohttp

from gateway.admin_attempts import AdminAttempts
from gateway.billing.keeper import LeaseKeeper
from gateway.billing.owner import BillingOwner
from gateway.billing.protocols import QuotaLedger
from gateway.journal import Journal
from gateway.keys import KeyCache
from gateway.metrics import NO_METRICS, Metrics
from gateway.polar.client import PolarBilling
from gateway.ratelimit.limiter import RateLimit
from gateway.recording import Recorder
from gateway.refusals import RefusalCounter
from gateway.settings import Settings
from gateway.store.base import Store
from gateway.store.leases_base import InvalidationKind


def process_owner_id() -> str:
    """Identifies this process on the records it holds in flight."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class Services:
    settings: Settings
    store: Store
    keys: KeyCache
    ledger: QuotaLedger
    limiter: RateLimit
    owner: str
    journal: Journal
    recorder: Recorder  # wakes the sync when events land (its `on_events`)
    billing: BillingOwner  # begins and finishes metered requests over ledger, limiter, journal and recorder
    refusals: RefusalCounter  # refusals per hour for the dashboard, added to the store in the background
    portal_limiter: RateLimit  # billing portal sessions per user (each one a Polar API call)
    client: aiohttp.ClientSession | None = None  # created in the lifespan (needs a running loop)
    polar: PolarBilling | None = None  # None when POLAR_ACCESS_TOKEN is not set
    metrics: Metrics = NO_METRICS  # GATEWAY_METRICS=off: hooks that do nothing
    keeper: LeaseKeeper | None = None  # shared: the leased ledger's keeper; tells this process what others changed
    admin_attempts: AdminAttempts = field(default_factory=AdminAttempts)  # failed admin-token checks by address

    async def limits_changed(self, user_id: str) -> None:
        """Polar changed a customer's limits (webhook or refresh): the next pre-check reloads them,
        here and (shared) in every other process."""
        self.ledger.invalidate(user_id)
        if self.keeper is not None:
            await self.store.notify_invalidation(InvalidationKind.LIMITS, user_id)

    async def key_revoked(self, key_id: str) -> None:
        """Refuse the key at once, here and (shared) in every other process."""
        self.keys.evict_key_id(key_id)
        if self.keeper is not None:
            await self.store.notify_invalidation(InvalidationKind.KEY, key_id)

    @property
    def http(self) -> aiohttp.ClientSession:
        if self.client is None:
            raise RuntimeError("upstream client not started")
        return self.client
