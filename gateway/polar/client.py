"""Polar billing client: the only place that talks to Polar, always through polar-sdk.

The SDK never retries and raises a zoo of exception types; this module turns them into
two signals the sync loop can act on (`RetryableError`, `BatchRejected`) and keeps
secrets (the access token) out of every message it produces.
"""

from __future__ import annotations

import logging
import math
import re
import time
import typing
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import polar.v2026_10.outputs as _sdk_outputs
from polar import PolarClientError, PolarDeserializationError, PolarNetworkError, PolarServerError
from polar.base import PolarRateLimitError
from polar.v2026_10 import PolarAsync
from polar.v2026_10.errors import HTTPValidationError, ResourceNotFound
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from gateway.meters import ALL_METERS, COUNT_METERS, MAX_CREDITED_UNITS
from gateway.settings import Settings
from gateway.store.base import CustomerLimits, MeterLimit, PendingEvent, SnapshotSource
from gateway.timeutil import iso, parse_iso, utcnow

# polar-sdk 1.0.2 types CustomerStateSubscription.status as Literal["granted","disabled"] (a generator
# bug); the API sends "active"/"trialing". adaptix caches loaders, so this must run before the first load.
_sdk_outputs.Status = typing.Literal["active", "trialing", "granted", "disabled"]

log = logging.getLogger("gateway.polar")

_USER_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_T = TypeVar("_T")


def valid_user_id(s: str) -> bool:
    """The SDK does not URL-encode path params, so only URL-safe ids may reach a Polar path."""
    return bool(_USER_ID.fullmatch(s)) and s not in (".", "..")


class PolarBillingError(Exception):
    """A Polar call failed; the message is safe to log (no token, no response bodies with secrets)."""


class RetryableError(PolarBillingError):
    """Network error, timeout, 429 or 5xx: try again later (after `retry_after` seconds if given)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class BatchRejected(PolarBillingError):
    """Polar refused the whole batch (422, 413, other 4xx). `bad_indexes` empty means "unknown"."""

    def __init__(self, bad_indexes: list[int], reason: str, reasons: Mapping[int, str] | None = None) -> None:
        super().__init__(reason)
        self.bad_indexes = bad_indexes
        self.reason = reason
        self.reasons: dict[int, str] = dict(reasons or {})


class PolarAuthError(PolarBillingError):
    """401/403: the token or its scopes are wrong. Not the events' fault, so never burn their attempts."""


class CustomerNotFound(PolarBillingError):
    """No Polar customer has this external id."""


class SessionRefused(PolarBillingError):
    """Polar refused a customer session's input (a 422 on another field than the customer)."""


@dataclass(frozen=True, slots=True)
class IngestResult:
    inserted: int
    duplicates: int


def _classify(exc: Exception, *, batch: bool = False) -> PolarBillingError:
    """Map an SDK exception to our error types (messages carry status codes, not bodies).

    With `batch`, a 413 (body too large) is a BatchRejected with unknown indexes, so the sync loop
    bisects. Any other 4xx but 422 says nothing about the events (a wrong base URL answers 404), so it
    only delays them: parking is for Polar refusing an event itself."""
    if isinstance(exc, PolarRateLimitError):
        return RetryableError("Polar rate limit (429)", float(exc.retry_after) if exc.retry_after else None)
    if isinstance(exc, PolarServerError):
        return RetryableError(f"Polar server error {exc.status_code}")
    if isinstance(exc, PolarNetworkError):
        cause = type(exc.__cause__).__name__ if exc.__cause__ else "unknown"
        return RetryableError(f"Polar network error: {cause}")
    if isinstance(exc, PolarDeserializationError):
        return RetryableError("unexpected Polar response shape")
    if isinstance(exc, PolarClientError) and exc.status_code in (401, 403):
        code = exc.status_code
        return PolarAuthError(f"Polar refused the access token ({code}); check POLAR_ACCESS_TOKEN scopes")
    if isinstance(exc, PolarClientError) and batch and exc.status_code == 413:
        return BatchRejected([], "Polar refused the batch as too large (413)")
    if isinstance(exc, PolarClientError) and batch:
        return RetryableError(f"Polar client error {exc.status_code}")
    if isinstance(exc, PolarClientError):
        return PolarBillingError(f"Polar client error {exc.status_code}")
    return PolarBillingError(f"Polar call failed: {type(exc).__name__}")


def _rejection(exc: HTTPValidationError) -> BatchRejected:
    reasons: dict[int, str] = {}
    other: list[str] = []
    for item in exc.error.detail or []:
        loc = list(item.loc)
        if len(loc) >= 3 and loc[0] == "body" and loc[1] == "events" and isinstance(loc[2], int):
            where = ".".join(str(p) for p in loc[3:])
            msg = f"{where}: {item.msg}" if where else item.msg
            reasons[loc[2]] = f"{reasons[loc[2]]}; {msg}" if loc[2] in reasons else msg
        else:
            other.append(item.msg)
    bad = sorted(reasons)
    summary = "; ".join([*(f"[{i}] {reasons[i]}" for i in bad[:5]), *other[:3]]) or "validation error"
    return BatchRejected(bad, f"Polar rejected the batch (422): {summary}", reasons)


def event_payload(event: PendingEvent, now: datetime) -> dict[str, Any]:
    """One ingest event. Timestamp is an ISO string clamped into the past (Polar 422s future ones)."""
    ts = event.timestamp if event.timestamp.tzinfo else event.timestamp.replace(tzinfo=now.tzinfo)
    ts = min(ts, now - timedelta(seconds=1))
    metadata: dict[str, str | int] = {"value": int(event.value)}
    if event.model:
        metadata["model"] = event.model[:500]
    if event.provider:
        metadata["provider"] = event.provider[:500]
    for key, value in event.modifiers:  # (fixed keys, all well under Polar's 40 characters)
        if value:
            metadata[key] = value[:500]
    return {
        "name": event.meter,
        "external_customer_id": event.user_id,
        "external_id": event.external_id,
        "timestamp": iso(ts),
        "metadata": metadata,
    }


def _get(obj: Any, key: str) -> Any:
    """Read a field from an SDK dataclass or from the raw JSON dict of the same object."""
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def meter_ids(state: Any) -> set[str]:
    """The meter ids a CustomerState (SDK object or raw JSON) names: its customer meters and the
    meters of its subscriptions."""
    ids = {_get(am, "meter_id") for am in _get(state, "active_meters") or []}
    for sub in _get(state, "active_subscriptions") or []:
        ids.update(_get(sm, "meter_id") for sm in _get(sub, "meters") or [])
    return {i for i in ids if isinstance(i, str)}


# What reading a malformed state raises (a wrong type, a number that isn't one, a bad date).
MALFORMED_STATE = (ValueError, TypeError, AttributeError, OverflowError)


def _units(value: Any) -> int:
    """Credited units as an int within +-MAX_CREDITED_UNITS: Polar's are unbounded, a store's 64-bit."""
    return max(-MAX_CREDITED_UNITS, min(int(value or 0), MAX_CREDITED_UNITS))


def _amount(value: Any) -> float:
    """Consumed units or a balance, likewise bounded; not a finite number is a ValueError."""
    number = float(value or 0)
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return max(-float(MAX_CREDITED_UNITS), min(number, float(MAX_CREDITED_UNITS)))


def limits_from_state(
    state: Any,
    meter_names: Mapping[str, str],
    snapshot_at: datetime,
    *,
    source: SnapshotSource = SnapshotSource.FETCH,
) -> CustomerLimits:
    """CustomerLimits from a Polar CustomerState (SDK object or raw webhook JSON).

    `active_meters` carry the credit balance. A meter that also has a metered price in an active
    subscription bills overage, so it is unlimited here (`credited=None`); not in a trialing one:
    Polar bills no usage ingested during a trial, so there it counts as unpriced. Credits-only meters
    are limited to their credited units. A meter with neither is left out, so the plan applies to
    it: Polar lists a customer meter (credited 0) from the first event for it on, and that event
    must not turn the plan's allowance into 0. Meters Polar reports but we don't know are skipped.
    Numbers saturate at MAX_CREDITED_UNITS. Reads the state only: a malformed one raises one of
    MALFORMED_STATE (a webhook answers it as invalid); no other error comes from here.
    """
    user_id = _get(state, "external_id")
    if not user_id:
        raise ValueError("customer state has no external_id")
    subs = [s for s in _get(state, "active_subscriptions") or [] if _get(s, "status") in ("active", "trialing")]
    metered: dict[str, tuple[float, int]] = {}
    for sub in subs:
        if _get(sub, "status") != "active":
            continue
        for sm in _get(sub, "meters") or []:
            name = meter_names.get(_get(sm, "meter_id"))
            if name:
                metered[name] = (_amount(_get(sm, "consumed_units")), _units(_get(sm, "credited_units")))
    meters: dict[str, MeterLimit] = {}
    for am in _get(state, "active_meters") or []:
        name = meter_names.get(_get(am, "meter_id"))
        if not name:
            continue
        credited = _units(_get(am, "credited_units"))
        if credited <= 0 and name not in metered:
            continue
        meters[name] = MeterLimit(
            meter=name,
            credited=None if name in metered else credited,
            consumed=_amount(_get(am, "consumed_units")),
            balance=_amount(_get(am, "balance")),
        )
    for name, (consumed, credited) in metered.items():
        if name not in meters:
            balance = _amount(credited - consumed)
            meters[name] = MeterLimit(meter=name, credited=None, consumed=consumed, balance=balance)
    period_start = period_end = None
    if subs:
        period_start = parse_iso(_get(subs[0], "current_period_start"))
        period_end = parse_iso(_get(subs[0], "current_period_end"))
    return CustomerLimits(
        user_id=user_id,
        meters=meters,
        period_start=period_start,
        period_end=period_end,
        snapshot_at=snapshot_at,
        updated_at=utcnow(),
        source=source,
    )


def meter_spec(name: str) -> dict[str, Any]:
    """The MeterCreate body for one of our meters: events named after the meter, SUM(value) or COUNT."""
    return {
        "name": name,
        "unit": "scalar" if name in COUNT_METERS else "token",
        "filter": {"conjunction": "and", "clauses": [{"property": "name", "operator": "eq", "value": name}]},
        "aggregation": {"func": "count"} if name in COUNT_METERS else {"func": "sum", "property": "value"},
    }


class PolarBilling:
    """One PolarAsync client per process; close() on shutdown."""

    def __init__(
        self,
        access_token: str,
        *,
        environment: str = "sandbox",
        base_url: str | None = None,
        organization_id: str | None = None,
        timeout: float = 10.0,
        ingest_timeout: float = 30.0,
        meters_ttl: float = 600.0,
        call_attempts: int = 2,
    ) -> None:
        if environment not in ("sandbox", "production"):
            raise ValueError("environment must be 'sandbox' or 'production'")
        self._client = PolarAsync(
            access_token,
            environment=typing.cast(typing.Literal["sandbox", "production"], environment),
            base_url=base_url or None,
            timeout=timeout,
            organization_id=organization_id or None,
        )
        self._ingest_timeout = ingest_timeout
        self._meters_ttl = meters_ttl
        self._call_attempts = call_attempts
        self._meter_names: dict[str, str] = {}
        self._listed: set[str] = set()  # every meter id the last listing had, ours or not
        self._unlisted: set[str] = set()  # ids asked about that it did not have (archived meters)
        self._meters_at = float("-inf")

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> PolarBilling:
        return cls(
            settings.polar_access_token,
            environment=settings.polar_environment,
            base_url=settings.polar_base_url or None,
            organization_id=settings.polar_organization_id or None,
            **kwargs,
        )

    def __repr__(self) -> str:  # never print the token
        return "PolarBilling()"

    async def close(self) -> None:
        await self._client.__aexit__(None, None, None)

    async def _call(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Short in-call retries for interactive/background reads; raises our error types."""
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self._call_attempts),
                retry=retry_if_exception_type((PolarServerError, PolarNetworkError)),
                wait=lambda _state: 0.2,
                reraise=True,
            ):
                with attempt:
                    return await fn()
        except (ResourceNotFound, HTTPValidationError):
            raise
        except Exception as exc:
            raise _classify(exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ events
    async def ingest(self, events: Sequence[PendingEvent]) -> IngestResult:
        """Send one batch. Polar validates the whole batch: any bad event -> BatchRejected."""
        now = utcnow()
        body: Any = [event_payload(e, now) for e in events]
        try:
            resp = await self._client.events.ingest(events=body, request_timeout=self._ingest_timeout)
        except HTTPValidationError as exc:
            raise _rejection(exc) from None
        except Exception as exc:
            raise _classify(exc, batch=True) from None
        return IngestResult(inserted=resp.inserted, duplicates=resp.duplicates)

    # ------------------------------------------------------------------ meters
    async def _list_meters(self) -> list[_sdk_outputs.Meter]:
        async def fetch() -> list[_sdk_outputs.Meter]:
            return [m async for m in self._client.meters.iter_list(is_archived=False, limit=100)]

        return await self._call(fetch)

    async def probe(self) -> None:
        """One cheap authenticated call (the meter list): raises `PolarBillingError` when Polar is
        unreachable or refuses the token."""
        await self._list_meters()

    async def meter_names(self, ids: Collection[str] = ()) -> dict[str, str]:
        """Polar meter id -> our meter name, cached (state payloads only carry meter ids).

        Of `ids` (those the caller maps), one no listing had is a meter created since: list again
        now, or its credits or price would be ignored until the cache expires. Meters not ours are
        in the listing and archived ones are remembered, so neither costs a listing per state."""
        unknown = set(ids) - self._listed - self._unlisted
        expired = time.monotonic() - self._meters_at > self._meters_ttl
        if unknown or expired:
            try:
                meters = await self._list_meters()
            except PolarBillingError as exc:
                if not self._meter_names:
                    raise
                log.warning("meter listing failed, using the cached one: %s", exc)
                return dict(self._meter_names)
            self._meter_names = {m.id: m.name for m in meters if m.name in ALL_METERS}
            self._listed = {m.id for m in meters}
            self._unlisted = ((set() if expired else self._unlisted) | unknown) - self._listed
            self._meters_at = time.monotonic()
        return dict(self._meter_names)

    async def setup_meters(self) -> list[tuple[str, str, bool]]:
        """Create missing meters; idempotent by name. Returns (name, id, created) per meter."""
        existing = {m.name: m.id for m in await self._list_meters()}
        out: list[tuple[str, str, bool]] = []
        for name in ALL_METERS:
            if name in existing:
                out.append((name, existing[name], False))
                continue
            meter = await self._call(self._create_meter_fn(name))
            out.append((name, meter.id, True))
        self._meters_at = float("-inf")
        return out

    def _create_meter_fn(self, name: str) -> Callable[[], Awaitable[_sdk_outputs.Meter]]:
        spec: Any = meter_spec(name)
        return lambda: self._client.meters.create(**spec)

    # ------------------------------------------------------------------ customers
    async def customer_limits(self, user_id: str) -> CustomerLimits | None:
        """Current limits from Polar's customer state; None when Polar has no such customer."""
        if not valid_user_id(user_id):
            raise ValueError("user id must match [A-Za-z0-9_.-]{1,128}")
        snapshot_at = utcnow()
        try:
            state = await self._call(lambda: self._client.customers.get_state_external(user_id))
        except ResourceNotFound:
            return None
        except HTTPValidationError:
            raise PolarBillingError("Polar rejected the customer state request (422)") from None
        return limits_from_state(state, await self.meter_names(meter_ids(state)), snapshot_at)

    async def ensure_customer(self, user_id: str, email: str) -> bool:
        """Create the Polar customer for our user id if missing. True when it was created now."""
        if not valid_user_id(user_id):
            raise ValueError("user id must match [A-Za-z0-9_.-]{1,128}")
        try:
            await self._call(lambda: self._client.customers.get_external(user_id))
            return False
        except ResourceNotFound:
            pass
        except HTTPValidationError:
            raise PolarBillingError("Polar rejected the customer lookup (422)") from None
        try:
            await self._call(lambda: self._client.customers.create(email=email, external_id=user_id))
        except HTTPValidationError as exc:
            if any(list(d.loc)[-1:] == ["external_id"] for d in exc.error.detail or []):
                return False  # created concurrently
            msgs = "; ".join(d.msg for d in exc.error.detail or [])
            raise PolarBillingError(f"Polar refused to create the customer: {msgs}") from None
        except ResourceNotFound:
            raise PolarBillingError("Polar customer endpoint not found") from None
        return True

    async def portal_url(self, user_id: str, return_url: str | None = None) -> str:
        """A customer-portal link (session TTL ~1 h) for the user to see usage and invoices."""
        if not valid_user_id(user_id):
            raise ValueError("user id must match [A-Za-z0-9_.-]{1,128}")
        body: Any = {"external_customer_id": user_id}
        if return_url:
            body["return_url"] = return_url
        try:
            session = await self._call(lambda: self._client.customer_sessions.create(**body))
        except ResourceNotFound:
            raise CustomerNotFound("no Polar customer for this user") from None
        except HTTPValidationError as exc:
            details = exc.error.detail or []
            if not details or any(list(d.loc)[-1:] == ["external_customer_id"] for d in details):
                raise CustomerNotFound("no Polar customer for this user") from None
            msgs = "; ".join(f"{'.'.join(str(p) for p in d.loc)}: {d.msg}" for d in details)
            raise SessionRefused(f"Polar refused the customer session (422): {msgs}") from None
        return session.customer_portal_url
