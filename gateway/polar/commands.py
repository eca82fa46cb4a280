"""Async bodies of the Polar CLI commands: `gateway sync`, `gateway usage`, `gateway polar setup`, and
the Polar customer that `gateway keys create --email` ensures.

Exit codes: 0 ok, 1 something left to do (pending/failed events, a Polar error), 2 not configured.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from typing import TextIO

from gateway.polar.client import PolarBilling, PolarBillingError, valid_user_id
from gateway.polar.sync import Syncer, SyncResult
from gateway.settings import ConfigError, Settings
from gateway.store.base import Outbox

_MORE_PASSES = 100
NO_TOKEN = "Polar is not configured: set POLAR_ACCESS_TOKEN (and POLAR_ENVIRONMENT=sandbox|production)."


async def run_sync(settings: Settings, store: Outbox, retry_failed: bool, *, out: TextIO | None = None) -> int:
    """Send everything pending now, backoffs included. Exit 1 if events remain pending or failed, else 0."""
    err = out or sys.stderr
    out = out or sys.stdout
    if not settings.polar_enabled:
        print(NO_TOKEN, file=err)
        return 2
    if retry_failed:
        n = await store.requeue_failed()
        print(f"re-queued {n} failed event(s)", file=out)
    polar = PolarBilling.from_settings(settings)
    result = SyncResult()
    try:
        syncer = Syncer(
            store,
            polar,
            owner=f"cli-{os.getpid()}-{uuid.uuid4().hex[:8]}",
            batch_size=settings.sync_batch_size,
            max_attempts=settings.sync_max_attempts,
        )
        # Pass after pass until nothing is claimed or Polar is unavailable: a pass delivers, or counts
        # a rejection towards parking. Bounded, as a running gateway may keep adding events.
        for _ in range(settings.sync_max_attempts + _MORE_PASSES):
            one = await syncer.run_once(everything=True)
            _add(result, one)
            if not one.claimed or one.error:
                break
    finally:
        await polar.close()
    print(
        f"sent {result.synced} event(s) to Polar ({result.inserted} new, {result.duplicates} already there)"
        f" in {result.batches} batch(es); {result.deferred} deferred, {result.rejected} rejected"
        f" ({result.parked} parked)",
        file=out,
    )
    if result.error:
        print(f"stopped early: {result.error}", file=out)
    rows = await store.usage_summary()
    pending = sum(r.pending for r in rows)
    failed = sum(r.failed for r in rows)
    print(f"outbox: {pending} pending, {failed} failed", file=out)
    if failed:
        for event, reason in await store.failed_events(limit=10):
            print(f"  failed {event.external_id} ({event.user_id} {event.meter}={event.value}): {reason}", file=out)
        print("fix the cause, then run `gateway sync --retry-failed`", file=out)
    return 1 if pending or failed else 0


def _add(total: SyncResult, one: SyncResult) -> None:
    for name in ("claimed", "synced", "inserted", "duplicates", "deferred", "rejected", "parked", "batches"):
        setattr(total, name, getattr(total, name) + getattr(one, name))
    total.error = one.error


async def print_usage(store: Outbox, user_id: str | None, as_json: bool, *, out: TextIO | None = None) -> int:
    """Per-user, per-meter totals with synced/pending/failed event counts."""
    out = out or sys.stdout
    rows = await store.usage_summary(user_id)
    if as_json:
        data = [
            {
                "user_id": r.user_id,
                "meter": r.meter,
                "total": r.total,
                "synced": r.synced,
                "pending": r.pending,
                "failed": r.failed,
            }
            for r in rows
        ]
        print(json.dumps(data, indent=2), file=out)
        return 0
    if not rows:
        print("no usage recorded" + (f" for {user_id}" if user_id else ""), file=out)
        return 0
    header = ("USER", "METER", "TOTAL", "SYNCED", "PENDING", "FAILED")
    table = [header] + [(r.user_id, r.meter, str(r.total), str(r.synced), str(r.pending), str(r.failed)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip(), file=out)
    return 0


async def polar_setup(settings: Settings, *, out: TextIO | None = None) -> int:
    """Create the gateway's meters in Polar (idempotent: existing ones are reported, not duplicated)."""
    err = out or sys.stderr
    out = out or sys.stdout
    if not settings.polar_enabled:
        print(NO_TOKEN, file=err)
        return 2
    polar = PolarBilling.from_settings(settings)
    try:
        meters = await polar.setup_meters()
    except PolarBillingError as exc:
        print(f"polar setup failed: {exc}", file=out)
        return 1
    finally:
        await polar.close()
    for name, meter_id, created in meters:
        print(f"{'created' if created else 'exists '}  {name}  {meter_id}", file=out)
    print(
        "next: add these meters to a Polar product (metered price or Meter Credits benefit), and point a"
        " webhook (api_version 2026-10) at /webhooks/polar with customer.state_changed, subscription.*"
        " and benefit_grant.* events",
        file=out,
    )
    return 0


async def ensure_customer(settings: Settings, user_id: str, email: str, *, out: TextIO | None = None) -> None:
    """Create the Polar customer whose external_id is our user id (no-op if it exists).

    Raises ConfigError (not configured, bad user id) or PolarBillingError (Polar refused/unavailable)."""
    out = out or sys.stdout
    if not settings.polar_enabled:
        raise ConfigError(NO_TOKEN)
    if not valid_user_id(user_id):
        raise ConfigError("user id must match [A-Za-z0-9_.-]{1,128} (it becomes a Polar URL path segment)")
    polar = PolarBilling.from_settings(settings)
    try:
        created = await polar.ensure_customer(user_id, email)  # PolarBillingError propagates
    finally:
        await polar.close()
    print(f"{'created' if created else 'exists'}: Polar customer for {user_id}", file=out)
