"""The store interface: every durable read and write the gateway makes.

Handlers, the ledger, the sync and the webhooks only see these dataclasses and the narrow
protocols below (`Store` is all of them); SQL lives in the implementations (`sqlite*.py`,
`postgres*.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

import orjson

from gateway.events import event_quantities
from gateway.modifiers import Modifiers, modifiers
from gateway.outcomes import Outcome
from gateway.ratelimit.budget import RateBudget
from gateway.store.dashboard_base import DashboardReads
from gateway.store.leases_base import LeaseStore
from gateway.store.refusals_base import RefusalStore


class RecordRejected(Exception):
    """The store refuses these records on their own (a value it cannot hold, a constraint they
    violate): trying again fails again, unlike an outage (down, locked, timed out). Each store
    tells the two apart (`finish_requests`); the caller narrows a batch down to the records at fault."""

    def __init__(self, cause: BaseException) -> None:
        # Why, briefly: a driver's message may quote a whole column of the batch.
        self.reason = f"{type(cause).__name__}: {cause}"[:200]
        super().__init__(self.reason)


@contextlib.contextmanager
def rejecting(refused: Callable[[BaseException], bool]) -> Iterator[None]:
    """Raise what `refused` (the store's own classification) blames on the records as `RecordRejected`."""
    try:
        yield
    except Exception as exc:
        if refused(exc):
            raise RecordRejected(exc) from exc
        raise


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    user_id: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One Polar event: a meter quantity for a user, with its deterministic external id."""

    external_id: str
    request_id: str
    user_id: str
    meter: str
    value: int
    model: str
    provider: str
    timestamp: datetime  # UTC, aware: when the request started


@dataclass(slots=True)
class RequestRecord:
    """A request: journaled before the upstream call (gateway/journal.py), stored when finished."""

    id: str
    user_id: str
    key_id: str
    provider: str
    model: str
    operation: str
    stream: bool
    started_at: datetime
    reservation: dict[str, int] = field(default_factory=dict)
    status_code: int | None = None
    outcome: str = Outcome.IN_FLIGHT.value  # how it ended: an `Outcome` value
    usage: dict[str, int] = field(default_factory=dict)
    usage_raw: Any = None
    estimated: bool = False
    finished_at: datetime | None = None
    owner: str = ""  # id of the process that holds it in flight
    # `iso` of started_at / finished_at when whoever set them had it (`timeutil.stamp`), else empty:
    # the journal and the store write it instead of formatting the datetime again.
    started_iso: str = field(default="", compare=False, repr=False)
    finished_iso: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class PendingEvent:
    external_id: str
    request_id: str
    user_id: str
    meter: str
    value: int
    model: str
    provider: str
    timestamp: datetime
    attempts: int
    # The request's non-default pricing modifiers (gateway/modifiers.py), the same for all its events.
    modifiers: Modifiers = ()


def pending_events(
    rows: Iterable[Sequence[Any]], timestamp: Callable[[Any], datetime] | None = None
) -> list[PendingEvent]:
    """Outbox rows (request id, user id, model, provider, started_at, usage JSON, attempts, then the
    raw usage's `modifiers.FIELDS` as strings or None) as their events; `timestamp` converts a
    started_at the driver does not return as a datetime."""
    events: list[PendingEvent] = []
    for rid, user_id, model, provider, started_at, usage, attempts, *raw in rows:
        ts = timestamp(started_at) if timestamp else started_at
        mods = modifiers(raw)
        events.extend(
            PendingEvent(xid, rid, user_id, meter, value, model, provider, ts, attempts, mods)
            for xid, meter, value in event_quantities(rid, orjson.loads(usage))
        )
    return events


@dataclass(frozen=True, slots=True)
class UsageSummaryRow:
    user_id: str
    meter: str
    total: int
    synced: int  # counts of events by sync state
    pending: int
    failed: int


@dataclass(frozen=True, slots=True)
class SyncBacklog:
    """Requests not yet in Polar (each carries one event per meter it used)."""

    pending: int  # waiting or being sent (claimed)
    failed: int  # parked after Polar rejected them max_attempts times
    oldest_pending_at: datetime | None  # start of the oldest pending request


@dataclass(frozen=True, slots=True)
class MeterLimit:
    meter: str
    credited: int | None  # None: unlimited
    consumed: float = 0.0  # as Polar last reported it (informational; quota uses local usage)
    balance: float | None = None


class SnapshotSource(StrEnum):
    """Where cached limits came from, so the clock of their `snapshot_at` is known."""

    WEBHOOK = "webhook"  # a Polar delivery: Polar's payload timestamp
    FETCH = "fetch"  # the customer state read from Polar: this machine's clock when it asked


@dataclass(frozen=True, slots=True)
class CustomerLimits:
    """Limits cached from Polar for one customer (external id == our user id)."""

    user_id: str
    meters: dict[str, MeterLimit]
    period_start: datetime | None
    period_end: datetime | None
    snapshot_at: datetime  # Polar's timestamp of the snapshot; older never overwrites newer
    updated_at: datetime  # when we stored it
    active: bool = True  # False after subscription.revoked: no credits
    source: SnapshotSource = SnapshotSource.FETCH


def meters_doc(meters: dict[str, MeterLimit]) -> dict[str, dict[str, Any]]:
    """`CustomerLimits.meters` as the JSON document both stores keep in customer_limits.meters."""
    return {name: {"credited": m.credited, "consumed": m.consumed, "balance": m.balance} for name, m in meters.items()}


def meters_from_doc(doc: dict[str, dict[str, Any]]) -> dict[str, MeterLimit]:
    return {
        name: MeterLimit(name, m.get("credited"), m.get("consumed", 0.0), m.get("balance")) for name, m in doc.items()
    }


class Lifecycle(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def migrate(self) -> list[str]:
        """Apply the migrations not applied yet (safe when several processes start at once); their names."""
        ...


class KeyStore(Protocol):
    async def create_key(self, key_id: str, user_id: str, name: str, prefix: str, key_hash: bytes) -> ApiKey: ...
    async def list_keys(self, user_id: str | None = None) -> list[ApiKey]: ...
    async def revoke_key(self, key_id: str) -> bool: ...
    async def find_key(self, key_hash: bytes) -> tuple[ApiKey, bytes] | None: ...


class RequestStore(Protocol):
    """Finished requests and their usage (the hot path)."""

    async def finish_request(self, record: RequestRecord) -> None: ...
    async def finish_requests(self, records: Sequence[RequestRecord]) -> None:
        """Many at once, in one transaction: one fails, all fail (callers then go one by one).
        A request with usage joins the outbox; its events are derived (`gateway.events`).
        Raises `RecordRejected` when the batch holds a record the store refuses on its own."""
        ...

    async def finished_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of these requests are stored already."""
        ...

    async def consumed(self, user_id: str, start: datetime, end: datetime) -> dict[str, int]: ...
    async def events_for_request(self, request_id: str) -> list[UsageEvent]: ...


class Outbox(Protocol):
    """The Polar outbox: the unit is a request; events come out expanded, outcomes go in by request id."""

    async def claim_events(
        self, owner: str, limit: int, lease_seconds: float, *, due_only: bool = True
    ) -> list[PendingEvent]:
        """Claim up to `limit` requests and return their events; `due_only=False` also takes
        those waiting out a rejection's backoff."""
        ...

    async def mark_synced(self, request_ids: Sequence[str]) -> None: ...
    async def mark_retry(self, request_ids: Sequence[str], error: str, retry_in: float, max_attempts: int) -> None:
        """Polar rejected these requests' events: count an attempt; park them at `max_attempts`;
        otherwise due again `retry_in` seconds from now on the store's clock (replicas' may differ)."""
        ...

    async def mark_deferred(self, request_ids: Sequence[str], error: str) -> None:
        """An outage held these claimed requests back: pending again, no attempt counted."""
        ...

    async def requeue_failed(self, user_id: str | None = None) -> int:
        """Failed requests back to pending; returns how many events that re-queues."""
        ...

    async def release_claims(self, keep_owner: str) -> int:
        """Claims of other (stopped) owners back to pending; returns how many requests."""
        ...

    async def release_owner_claims(self, owner: str) -> int:
        """Claims of one stopped owner back to pending (processes sharing the database); how many requests."""
        ...

    async def usage_summary(self, user_id: str | None = None) -> list[UsageSummaryRow]: ...
    async def failed_events(self, limit: int = 100) -> list[tuple[PendingEvent, str]]: ...
    async def sync_backlog(self) -> SyncBacklog:
        """Cheap enough to poll every second: read from an index of the unsynced requests only."""
        ...


class LimitsStore(Protocol):
    """Limits cached from Polar."""

    async def get_limits(self, user_id: str) -> CustomerLimits | None: ...
    async def put_limits(self, limits: CustomerLimits) -> bool:
        """Store unless a newer snapshot is stored; False when it was older."""
        ...

    async def stale_limit_users(self, older_than: datetime, limit: int) -> list[str]: ...
    async def known_users(self) -> list[str]: ...


class WebhookLog(Protocol):
    async def record_webhook(self, webhook_id: str, event_type: str) -> bool:
        """Claim a delivery (insert if absent, atomic across processes); False when this webhook id
        was recorded before."""
        ...

    async def forget_webhook(self, webhook_id: str) -> None:
        """Drop a claimed delivery whose processing failed, so the sender's retry is processed."""
        ...

    async def prune_webhooks(self, older_than: datetime, limit: int) -> int:
        """Delete at most `limit` deliveries claimed before `older_than`, oldest first (one short
        transaction; concurrent callers delete disjoint rows or nothing); how many were deleted."""
        ...


class Store(
    Lifecycle,
    KeyStore,
    RequestStore,
    Outbox,
    LimitsStore,
    WebhookLog,
    RateBudget,
    LeaseStore,
    DashboardReads,
    RefusalStore,
    Protocol,
):
    """Everything: what `gateway.store.create_store` returns. Users annotate the narrow protocol they need."""


# Users needing two of the protocols (Python has no intersection types).
class QuotaStore(RequestStore, LimitsStore, Protocol):
    """What the quota ledger reads: consumed usage and cached limits."""


class WebhookStore(WebhookLog, LimitsStore, Protocol):
    """What the Polar webhook endpoint writes: delivery ids and limits."""


class RecoveryStore(RequestStore, Outbox, Protocol):
    """What start-up recovery writes: journaled requests, and stale sync claims handed back."""
