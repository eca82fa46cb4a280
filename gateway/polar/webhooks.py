"""POST /webhooks/polar: verified Polar deliveries update the cached customer limits.

Signatures are checked by polar-sdk's `validate_event` (polar.webhooks) on the raw body (it accepts both the
legacy and the Standard Webhooks secret encodings). Deliveries are deduplicated on
`webhook-id`, claimed before processing so that a delivery reaching several replicas is applied
once (a failed one is forgotten again, for Polar's retry); snapshots are ordered by the payload
timestamp (the store refuses older ones), so retries and out-of-order deliveries can't roll limits
back. A snapshot fetched from Polar is stamped with this machine's clock instead: a webhook "older"
than one is only older on one of two clocks, so it has the state fetched again rather than dropped.
Answers fast: Polar gives 2 s. A database that does not answer within `store_timeout` gets a 503
(Polar retries); the delivery's processing goes on and, once the database answers, is applied once.
A signed delivery whose data cannot be applied is answered 202 `invalid` and stays claimed: its
retries would fail the same way, and an endpoint that keeps failing is disabled by Polar.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import typing
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

import orjson
import polar.v2026_10.webhooks as sdk_webhooks
from polar.base import deserialize
from polar.webhooks import (
    PolarWebhookError,
    PolarWebhookUnknownTypeError,
    PolarWebhookVerificationError,
    validate_event,
)
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.http_api import MAX_BODY_BYTES, BodyRefused, StoreUnavailable, api_error, from_store, read_body
from gateway.metrics import NO_METRICS, OTHER, Metrics
from gateway.polar.client import (
    MALFORMED_STATE,
    PolarBilling,
    PolarBillingError,
    limits_from_state,
    meter_ids,
    valid_user_id,
)
from gateway.store.base import CustomerLimits, SnapshotSource, WebhookLog, WebhookStore
from gateway.timeutil import parse_iso, utcnow

log = logging.getLogger("gateway.webhooks")

MeterNamesProvider = Callable[[Collection[str]], Awaitable[Mapping[str, str]]]  # for these meter ids
LimitsChanged = Callable[[str], Awaitable[None]]
Endpoint = Callable[[Request], Awaitable[Response]]

# Every type this SDK version knows (unknown ones are answered 202), read from its public payload union.
KNOWN_EVENT_TYPES = frozenset(
    t
    for cls in typing.get_args(sdk_webhooks.WebhookPayload)
    for t in typing.get_args(typing.get_type_hints(cls)["type"])
)


# A payload timestamp further ahead of this clock is the payload's error (a bad clock at Polar): stored, it
# would make every later webhook for the customer `stale` until then. Generous: clocks only drift seconds.
MAX_TIMESTAMP_AHEAD = timedelta(days=1)

PRUNE_BATCH = 500  # deliveries deleted per statement: a short write lock however big the backlog
PRUNE_MAX_BATCHES = 200  # per call; what is left waits for the next
PRUNE_EVERY = 3600.0  # seconds: deliveries come a few per customer and day


async def prune_deliveries(
    store: WebhookLog, retention_seconds: float, *, batch: int = PRUNE_BATCH, max_batches: int = PRUNE_MAX_BATCHES
) -> int:
    """Forget deliveries claimed more than `retention_seconds` ago (far beyond Polar's retries, so a
    retry still finds its claim), in batches of `batch`, each its own transaction; how many."""
    older_than = utcnow() - timedelta(seconds=retention_seconds)
    pruned = 0
    for _ in range(max_batches):
        n = await store.prune_webhooks(older_than, batch)
        pruned += n
        if n < batch:
            break
        await asyncio.sleep(0)  # let requests waiting on the store in between
    if pruned:
        log.info("forgot %d Polar webhook deliveries older than %s", pruned, older_than.date())
    return pruned


async def prune_forever(
    store: WebhookLog,
    retention_seconds: float,
    stop: asyncio.Event,
    *,
    every: float = PRUNE_EVERY,
    batch: int = PRUNE_BATCH,
) -> None:
    """`prune_deliveries` at start and every `every` seconds until `stop`. Runs in every process that
    receives webhooks: concurrent deletes take disjoint rows or none. A failure waits for the next round."""
    while not stop.is_set():
        try:
            await prune_deliveries(store, retention_seconds, batch=batch)
        except Exception:
            log.exception("pruning old webhook deliveries failed; retrying later")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)


def _load_payload(data: dict[str, Any]) -> Any:
    """Typed-load only the payload we read fields from. The SDK's own loader builds adaptix loaders
    for every payload type on first use, seconds of CPU that would block the event loop."""
    if data.get("type") == "customer.state_changed":
        return deserialize(data, sdk_webhooks.WebhookCustomerStateChangedPayload)
    return None


class InvalidPayload(Exception):
    """A verified delivery whose data cannot be applied: a retry of it would fail the same way."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what  # names the part, never quotes the payload


@contextlib.contextmanager
def _reading(what: str) -> Iterator[None]:
    """Errors raised while reading the payload's data are the payload's. Only code that reads the payload
    runs inside (never the store or Polar, whose errors are transient and must reach Polar as a 5xx)."""
    try:
        yield
    except MALFORMED_STATE as exc:
        raise InvalidPayload(f"{what} ({type(exc).__name__})") from None


def _field(obj: Any, *path: str) -> Any:
    for key in path:
        if obj is None:
            return None
        obj = obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)
    return obj


def make_webhook_endpoint(
    store: WebhookStore,
    secret: str,
    meter_names_provider: MeterNamesProvider,
    on_limits_changed: LimitsChanged,
    *,
    polar: PolarBilling | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    metrics: Metrics = NO_METRICS,
    store_timeout: float = 5.0,
) -> Endpoint:
    """The Starlette endpoint. `polar` (optional) lets benefit_grant.* refresh the customer's state."""
    refreshing: set[asyncio.Task[None]] = set()

    async def endpoint(request: Request) -> Response:
        event_type, outcome, response = await _receive(request)
        # An unverified body or an unknown type is "other": a label value is never what a sender chose.
        metrics.webhook(event_type if event_type in KNOWN_EVENT_TYPES else OTHER, outcome)
        return response

    async def _receive(request: Request) -> tuple[str, str, Response]:
        """(event type, outcome, the answer)"""
        if not secret:
            return OTHER, "unconfigured", api_error(503, "webhooks are not configured")
        try:
            body = await read_body(request, max_body_bytes)
        except BodyRefused as exc:
            return OTHER, "invalid_payload", exc.response
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return OTHER, "invalid_payload", api_error(400, "invalid payload")
        headers = dict(request.headers)
        typed: Any = None
        try:
            typed = validate_event(text, headers, secret, KNOWN_EVENT_TYPES, _load_payload)
        except PolarWebhookVerificationError:
            return OTHER, "invalid_signature", api_error(403, "invalid signature")
        except RecursionError:
            # The SDK parses the verified body with the json module, which gives up on deep nesting this way.
            return OTHER, "invalid_payload", api_error(400, "invalid payload")
        except PolarWebhookUnknownTypeError as exc:
            log.info("ignoring unknown Polar webhook type %r", exc.event_type)
            return OTHER, "ignored", JSONResponse({"status": "ignored"}, status_code=202)
        except PolarWebhookError:
            # The signature is verified (it is checked first; the body is valid UTF-8), but this SDK
            # version could not load the payload model. Fall back to the raw JSON for what we need.
            log.warning("Polar webhook payload did not load into the SDK model; using raw JSON")
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError:
            return OTHER, "invalid_payload", api_error(400, "invalid payload")
        if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
            return OTHER, "invalid_payload", api_error(400, "invalid payload")
        event_type: str = raw["type"]
        # Claim, process and (on failure) forget as one call: given up on at the deadline, it still
        # ends as a whole, so a claim never stands without its processing (a retry would be a duplicate).
        apply = _apply(headers.get("webhook-id", ""), event_type, typed, raw)
        try:
            status = await from_store(apply, store_timeout, f"Polar webhook {event_type}")
        except StoreUnavailable as exc:
            return event_type, "unavailable", exc.response
        if status == "failed":
            return event_type, status, api_error(500, "processing failed")
        if status == "invalid":  # answered like the deliveries we ignore: 2xx, so Polar stops retrying
            return event_type, status, JSONResponse({"status": status}, status_code=202)
        return event_type, status, JSONResponse({"status": status}, status_code=200)

    async def _apply(webhook_id: str, event_type: str, typed: Any, raw: dict[str, Any]) -> str:
        # Claim the delivery first: of replicas receiving it at once, one processes it.
        if not await store.record_webhook(webhook_id, event_type):
            return "duplicate"
        try:
            return await _handle(event_type, typed, raw)
        except InvalidPayload as exc:
            # Kept claimed (a retry is a duplicate). The limits refresher catches the customer up.
            log.error(
                "Polar webhook %s %r is signed but cannot be applied (%s); answered 202 invalid, not retried",
                event_type,
                webhook_id[:200],
                exc.what,
            )
            return "invalid"
        except Exception:
            log.exception("processing Polar webhook %s failed", event_type)
            await store.forget_webhook(webhook_id)  # so that Polar's retry is processed
            return "failed"

    async def _handle(event_type: str, typed: Any, raw: dict[str, Any]) -> str:
        data = typed.data if typed is not None else raw.get("data")
        ts_text = typed.timestamp if typed is not None else raw.get("timestamp")
        with _reading("timestamp"):
            snapshot_at = parse_iso(ts_text) if isinstance(ts_text, str) else utcnow()
        if snapshot_at > utcnow() + MAX_TIMESTAMP_AHEAD:
            raise InvalidPayload("timestamp too far ahead")
        if event_type == "customer.state_changed":
            user_id = _user_id(data, "external_id")
            if not user_id:
                return "ignored"  # a Polar customer that isn't one of our users
            with _reading("customer state"):
                ids = meter_ids(data)
            names = await meter_names_provider(ids)  # Polar: its failure is transient
            with _reading("customer state"):
                limits = limits_from_state(data, names, snapshot_at, source=SnapshotSource.WEBHOOK)
            return await _put(limits)
        if event_type == "subscription.revoked":
            user_id = _user_id(data, "customer", "external_id")
            if not user_id:
                return "ignored"
            old = await store.get_limits(user_id)
            revoked = CustomerLimits(
                user_id=user_id,
                meters=dict(old.meters) if old else {},
                period_start=old.period_start if old else None,
                period_end=old.period_end if old else None,
                snapshot_at=snapshot_at,
                updated_at=utcnow(),
                active=False,
                source=SnapshotSource.WEBHOOK,
            )
            return await _put(revoked)
        if event_type == "subscription.canceled":
            # Access continues until the period ends; subscription.revoked (or the next
            # customer.state_changed) is what changes limits.
            return "noted"
        if event_type.startswith("benefit_grant."):
            user_id = _user_id(data, "customer", "external_id")
            if not user_id or polar is None:
                return "ignored"
            # Credits changed; fetch the fresh state.
            _fetch(polar, user_id, event_type)
            return "refresh_scheduled"
        return "ignored"

    def _user_id(data: Any, *path: str) -> str | None:
        """Our user id from the payload; None for a customer that isn't one of our users (no external
        id, or one no user id can be). Not a string at all is the payload's error."""
        with _reading("customer id"):
            value = _field(data, *path)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise InvalidPayload("customer id is not a string")
        return value if valid_user_id(value) else None

    def _fetch(client: PolarBilling, user_id: str, why: str, newer_than: datetime | None = None) -> None:
        """Fetch and store the user's state in the background (Polar wants a 2xx within 2 s)."""
        task = asyncio.create_task(_refresh(client, user_id, why, newer_than))
        refreshing.add(task)
        task.add_done_callback(refreshing.discard)

    async def _refresh(client: PolarBilling, user_id: str, why: str, newer_than: datetime | None) -> None:
        try:
            limits = await client.customer_limits(user_id)
            if limits is not None and newer_than is not None and limits.snapshot_at <= newer_than:
                # Asked after that snapshot was stored, so newer than it, whatever the clock that stamped it.
                limits = dataclasses.replace(limits, snapshot_at=newer_than + timedelta(microseconds=1))
            if limits is not None:
                await _put(limits)
        except PolarBillingError as exc:  # the LimitsRefresher catches up later
            log.warning("refresh after %s failed: %s", why, exc)
        except Exception:
            log.exception("refresh after %s failed", why)

    async def _put(limits: CustomerLimits) -> str:
        if await store.put_limits(limits):
            await on_limits_changed(limits.user_id)
            return "updated"
        if limits.source is SnapshotSource.WEBHOOK and polar is not None:
            stored = await store.get_limits(limits.user_id)
            if stored is not None and stored.source is SnapshotSource.FETCH:
                # Older only than a fetch stamped by a local clock, which may run ahead of Polar's: the
                # update may be newer. Polar's state now is, so fetch it (a webhook older than another
                # webhook is compared on Polar's clock alone: stale).
                _fetch(polar, limits.user_id, "a webhook older than a fetch", stored.snapshot_at)
                return "refresh_scheduled"
        return "stale"  # an equal-or-newer snapshot is already stored

    return endpoint
