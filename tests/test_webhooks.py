"""POST /webhooks/polar served by uvicorn over loopback: signatures, dedup, ordering, event types,
forgetting old deliveries."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import uvicorn
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.meters import CLAUDE_INPUT, CLAUDE_OUTPUT, GEMINI_IMAGES, MAX_CREDITED_UNITS
from gateway.metrics import NullMetrics
from gateway.polar import client as polar_client
from gateway.polar.client import PolarBilling
from gateway.polar.webhooks import make_webhook_endpoint, prune_forever
from gateway.store import Store
from gateway.store.base import CustomerLimits, MeterLimit, WebhookStore
from gateway.timeutil import iso
from tests.conftest import Gateway, poll_until, wait_until
from tests.fakes.polar import FakePolar, new_standard_secret, sign_webhook, webhook_payload
from tests.support_db import Database, Databases, open_store, run_async

STANDARD_SECRET = new_standard_secret()


def api_error(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


INVALID_PAYLOAD = api_error("invalid_request", "invalid payload")
LEGACY_SECRET = "polar_whs_" + secrets.token_urlsafe(24)  # legacy endpoints: key = the secret's UTF-8 bytes


@dataclass
class Hook:
    url: str
    store: Store
    fake: FakePolar
    secret: str
    client: httpx.AsyncClient
    changed: list[str] = field(default_factory=list)
    counted: list[tuple[str, str]] = field(default_factory=list)  # (type, outcome) per delivery

    async def send(
        self, payload: dict[str, Any], *, secret: str | None = None, legacy: bool | None = None, **kw: Any
    ) -> httpx.Response:
        secret = secret or self.secret
        legacy = (secret != STANDARD_SECRET) if legacy is None else legacy
        body, headers = sign_webhook(payload, secret, legacy=legacy, **kw)
        return await self.client.post(self.url, content=body, headers=headers)


async def serve(app: Starlette) -> tuple[str, uvicorn.Server, asyncio.Task[None]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", access_log=False, log_config=None))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/webhooks/polar", server, task


class WebhookTally(NullMetrics):
    """Metrics that keep the webhook counts (a fake: only the hook these tests read)."""

    def __init__(self) -> None:
        self.counted: list[tuple[str, str]] = []

    def webhook(self, event_type: str, outcome: str) -> None:
        self.counted.append((event_type, outcome))


async def make_hook(
    store: Store, fake: FakePolar, secret: str, *, webhook_store: WebhookStore | None = None
) -> AsyncIterator[Hook]:
    polar = PolarBilling(fake.token, base_url=fake.url, timeout=2.0, call_attempts=1)
    changed: list[str] = []
    tally = WebhookTally()

    async def on_changed(user_id: str) -> None:
        changed.append(user_id)

    endpoint = make_webhook_endpoint(
        webhook_store or store, secret, polar.meter_names, on_changed, polar=polar, metrics=tally
    )
    url, server, task = await serve(Starlette(routes=[Route("/webhooks/polar", endpoint, methods=["POST"])]))
    async with httpx.AsyncClient(timeout=10) as client:
        yield Hook(url, store, fake, secret, client, changed, tally.counted)
    server.should_exit = True
    await asyncio.wait_for(task, 10)
    await polar.close()


@pytest.fixture
async def hook(store: Store, fake: FakePolar) -> AsyncIterator[Hook]:
    async for h in make_hook(store, fake, STANDARD_SECRET):
        yield h


def state_changed(fake: FakePolar, user: str, credited: int, ts: datetime | None = None) -> dict[str, Any]:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    fake.set_state(user, {CLAUDE_INPUT: (credited, 10.0)}, start, start + timedelta(days=31))
    return webhook_payload("customer.state_changed", fake.state_payload(user), ts)


def expected(credited: int, ts: datetime) -> dict[str, Any]:
    return {
        "meters": {CLAUDE_INPUT: MeterLimit(CLAUDE_INPUT, credited=credited, consumed=10.0, balance=credited - 10.0)},
        "period_start": datetime(2026, 1, 1, tzinfo=UTC),
        "period_end": datetime(2026, 2, 1, tzinfo=UTC),
        "snapshot_at": ts,
        "active": True,
    }


def view(limits: CustomerLimits | None) -> dict[str, Any] | None:
    if limits is None:
        return None
    keys = ("meters", "period_start", "period_end", "snapshot_at", "active")
    return {k: getattr(limits, k) for k in keys}


@pytest.mark.parametrize("encoding", ["standard", "legacy"])
async def test_signed_state_changed_updates_limits(store: Store, fake: FakePolar, encoding: str) -> None:
    secret = STANDARD_SECRET if encoding == "standard" else LEGACY_SECRET
    async for hook in make_hook(store, fake, secret):
        ts = datetime(2026, 1, 15, 12, 0, 1, tzinfo=UTC)
        resp = await hook.send(state_changed(fake, "user-123", 1000, ts), legacy=encoding == "legacy")
        assert (resp.status_code, resp.json()) == (200, {"status": "updated"})
        assert view(await store.get_limits("user-123")) == expected(1000, ts)
        assert hook.changed == ["user-123"]


async def test_forged_or_tampered_signature_is_403_and_changes_nothing(hook: Hook) -> None:
    payload = state_changed(hook.fake, "user-123", 1000)
    resp = await hook.send(payload, secret=new_standard_secret(), legacy=False)
    assert (resp.status_code, resp.json()) == (403, api_error("permission_denied", "invalid signature"))
    body, headers = sign_webhook(payload, STANDARD_SECRET, legacy=False, msg_id="wh_tamper")
    resp = await hook.client.post(hook.url, content=body.replace(b"1000", b"9999"), headers=headers)
    assert resp.status_code == 403
    resp = await hook.client.post(hook.url, content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 403
    assert await hook.store.get_limits("user-123") is None
    assert await hook.store.record_webhook("wh_tamper", "x")  # never claimed
    assert hook.changed == []


async def test_stale_timestamp_is_403(hook: Hook) -> None:
    old = datetime.now(UTC) - timedelta(minutes=10)
    resp = await hook.send(state_changed(hook.fake, "user-123", 1000), timestamp=old)
    assert resp.status_code == 403
    assert await hook.store.get_limits("user-123") is None


async def test_replayed_webhook_id_is_not_processed_twice(hook: Hook) -> None:
    payload = state_changed(hook.fake, "user-123", 1000)
    first = await hook.send(payload, msg_id="msg_replay")
    assert (first.status_code, first.json()) == (200, {"status": "updated"})
    # same delivery id, even with different (validly signed) content: not processed again
    second = await hook.send(state_changed(hook.fake, "user-123", 5), msg_id="msg_replay")
    assert (second.status_code, second.json()) == (200, {"status": "duplicate"})
    limits = await hook.store.get_limits("user-123")
    assert limits is not None and limits.meters[CLAUDE_INPUT].credited == 1000
    assert hook.changed == ["user-123"]


async def test_older_snapshot_never_overwrites_newer(hook: Hook) -> None:
    t1 = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)
    t2 = t1 + timedelta(seconds=30)
    newer = await hook.send(state_changed(hook.fake, "user-123", 2000, t2))
    assert newer.json() == {"status": "updated"}
    older = await hook.send(state_changed(hook.fake, "user-123", 1000, t1))  # delivered late
    assert (older.status_code, older.json()) == (200, {"status": "stale"})
    assert view(await hook.store.get_limits("user-123")) == expected(2000, t2)
    assert hook.changed == ["user-123"]


async def test_a_meter_created_after_the_names_were_cached_still_counts(hook: Hook) -> None:
    first = await hook.send(state_changed(hook.fake, "user-123", 1000))  # lists (and caches) Polar's meters
    assert first.json() == {"status": "updated"}
    # `gateway polar setup` run again creates a meter, and a product credits it
    start = datetime(2026, 1, 1, tzinfo=UTC)
    hook.fake.set_state(
        "user-9", {CLAUDE_INPUT: (1000, 10.0), GEMINI_IMAGES: (50, 2.0)}, start, start + timedelta(days=31)
    )
    resp = await hook.send(webhook_payload("customer.state_changed", hook.fake.state_payload("user-9")))
    assert (resp.status_code, resp.json()) == (200, {"status": "updated"})
    limits = await hook.store.get_limits("user-9")
    assert limits is not None and limits.meters == {
        CLAUDE_INPUT: MeterLimit(CLAUDE_INPUT, credited=1000, consumed=10.0, balance=990.0),
        GEMINI_IMAGES: MeterLimit(GEMINI_IMAGES, credited=50, consumed=2.0, balance=48.0),
    }


async def test_unknown_type_is_202_and_no_secret_is_503(hook: Hook, store: Store) -> None:
    resp = await hook.send({"type": "meter.exploded", "timestamp": "2026-01-15T12:00:00Z", "data": {}})
    assert (resp.status_code, resp.json()) == (202, {"status": "ignored"})
    async for unconfigured in make_hook(store, hook.fake, ""):
        resp = await unconfigured.send(state_changed(hook.fake, "user-123", 1), secret=STANDARD_SECRET)
        assert (resp.status_code, resp.json()) == (503, api_error("unavailable", "webhooks are not configured"))


async def test_subscription_revoked_deactivates_and_canceled_waits(hook: Hook) -> None:
    ts = datetime.now(UTC) - timedelta(seconds=10)
    await hook.send(state_changed(hook.fake, "user-123", 1000, ts))
    canceled = webhook_payload("subscription.canceled", {"customer": {"external_id": "user-123"}})
    resp = await hook.send(canceled)
    assert (resp.status_code, resp.json()) == (200, {"status": "noted"})
    assert view(await hook.store.get_limits("user-123")) == expected(1000, ts)
    # a minimal Subscription payload: the SDK model can't load it, the verified raw JSON is used
    revoked = webhook_payload("subscription.revoked", {"customer": {"external_id": "user-123"}})
    resp = await hook.send(revoked)
    assert (resp.status_code, resp.json()) == (200, {"status": "updated"})
    limits = await hook.store.get_limits("user-123")
    assert limits is not None and limits.active is False
    assert hook.changed == ["user-123", "user-123"]


async def test_benefit_grant_triggers_a_state_refresh(hook: Hook) -> None:
    hook.fake.set_state("user-77", {CLAUDE_OUTPUT: (5000, 1.0)})
    payload = webhook_payload("benefit_grant.cycled", {"customer": {"external_id": "user-77"}})
    resp = await hook.send(payload)
    assert (resp.status_code, resp.json()) == (200, {"status": "refresh_scheduled"})
    deadline = time.monotonic() + 10
    while (limits := await hook.store.get_limits("user-77")) is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert limits.meters == {CLAUDE_OUTPUT: MeterLimit(CLAUDE_OUTPUT, credited=5000, consumed=1.0, balance=4999.0)}
    assert "GET /v1/customers/external/user-77/state" in hook.fake.paths()


async def test_valid_signature_on_garbage_is_400(hook: Hook) -> None:
    body = b"not json"
    msg_id, ts = "msg_garbage", datetime.now(UTC)
    signature = Webhook(STANDARD_SECRET).sign(msg_id, ts, body.decode())
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(ts.timestamp())), "webhook-signature": signature}
    resp = await hook.client.post(hook.url, content=body, headers=headers)
    assert (resp.status_code, resp.json()) == (400, INVALID_PAYLOAD)
    assert await hook.store.record_webhook(msg_id, "x")  # never claimed


async def test_valid_signature_on_deep_nesting_is_400(hook: Hook) -> None:
    # The SDK's json module raises RecursionError on this, after the signature checked out.
    body = '{"type": "customer.state_changed", "data": ' + "[" * 5_000 + "]" * 5_000 + "}"
    msg_id, ts = "msg_deep", datetime.now(UTC)
    signature = Webhook(STANDARD_SECRET).sign(msg_id, ts, body)
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(ts.timestamp())), "webhook-signature": signature}
    resp = await hook.client.post(hook.url, content=body, headers=headers)
    assert (resp.status_code, resp.json()) == (400, INVALID_PAYLOAD)
    assert await hook.store.record_webhook(msg_id, "x")  # never claimed


# ---------------------------------------------------------------- signed deliveries that cannot be applied

INVALID = (202, {"status": "invalid"})


def _bad_timestamp(payload: dict[str, Any]) -> None:
    payload["timestamp"] = "yesterday-ish SECRET-ISH-TEXT"


def _numeric_external_id(payload: dict[str, Any]) -> None:
    payload["data"]["external_id"] = 12345


def _credited_not_a_number(payload: dict[str, Any]) -> None:
    payload["data"]["active_meters"][0]["credited_units"] = "lots SECRET-ISH-TEXT"


def _meters_not_a_list(payload: dict[str, Any]) -> None:
    payload["data"]["active_meters"] = 7


def _meter_id_a_list(payload: dict[str, Any]) -> None:
    payload["data"]["active_meters"][0]["meter_id"] = ["SECRET-ISH-TEXT"]


@pytest.mark.parametrize(
    "spoil", [_bad_timestamp, _numeric_external_id, _credited_not_a_number, _meters_not_a_list, _meter_id_a_list]
)
async def test_signed_but_malformed_state_is_answered_invalid_once(
    hook: Hook, spoil: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A payload error is not transient: a 5xx would have Polar retry it (and fail) until it disables the endpoint.
    payload = state_changed(hook.fake, "user-123", 1000)
    spoil(payload)
    with caplog.at_level(logging.INFO, logger="gateway.webhooks"):
        first = await hook.send(payload, msg_id="msg_poison")
    assert (first.status_code, first.json()) == INVALID
    assert await hook.store.get_limits("user-123") is None
    again = await hook.send(payload, msg_id="msg_poison")  # kept claimed: Polar's retry is a duplicate
    assert (again.status_code, again.json()) == (200, {"status": "duplicate"})
    assert hook.counted == [("customer.state_changed", "invalid"), ("customer.state_changed", "duplicate")]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # once, without a traceback
    assert len(errors) == 1 and not any(r.exc_info for r in caplog.records)
    assert "customer.state_changed" in errors[0] and "msg_poison" in errors[0]
    assert "SECRET-ISH-TEXT" not in caplog.text and hook.secret not in caplog.text
    assert hook.changed == []


@pytest.mark.parametrize("event_type", ["subscription.revoked", "benefit_grant.created"])
async def test_a_non_string_customer_id_is_invalid_not_a_500(hook: Hook, event_type: str) -> None:
    resp = await hook.send(webhook_payload(event_type, {"customer": {"external_id": ["u"]}}))
    assert (resp.status_code, resp.json()) == INVALID
    assert hook.counted == [(event_type, "invalid")]


async def test_an_external_id_no_user_can_have_is_ignored(hook: Hook) -> None:
    payload = state_changed(hook.fake, "user-123", 1000)
    payload["data"]["external_id"] = "user\x00123"  # (PostgreSQL text refuses NUL: a 500 on every retry)
    resp = await hook.send(payload)
    assert (resp.status_code, resp.json()) == (200, {"status": "ignored"})
    assert await hook.store.get_limits("user-123") is None


async def test_polar_unavailable_for_meter_names_is_500_and_the_retry_applies(hook: Hook) -> None:
    payload = state_changed(hook.fake, "user-123", 1000)
    hook.fake.fail_next(1, 503, path="/v1/meters/")
    first = await hook.send(payload, msg_id="msg_transient")
    assert (first.status_code, first.json()) == (500, api_error("internal_error", "processing failed"))
    again = await hook.send(payload, msg_id="msg_transient")  # the claim was forgotten: processed now
    assert (again.status_code, again.json()) == (200, {"status": "updated"})
    assert hook.counted == [("customer.state_changed", "failed"), ("customer.state_changed", "updated")]


class RefusingStore:
    """The store, but its next `put_limits` fails the way a database does (not the payload's fault)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.refuse = 1

    async def put_limits(self, limits: CustomerLimits) -> bool:
        if self.refuse:
            self.refuse -= 1
            raise ConnectionResetError("database went away")
        return await self.store.put_limits(limits)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def test_a_store_failure_is_500_and_the_retry_applies(store: Store, fake: FakePolar) -> None:
    refusing: Any = RefusingStore(store)
    async for hook in make_hook(store, fake, STANDARD_SECRET, webhook_store=refusing):
        payload = state_changed(fake, "user-123", 1000)
        first = await hook.send(payload, msg_id="msg_db")
        assert first.status_code == 500
        again = await hook.send(payload, msg_id="msg_db")
        assert (again.status_code, again.json()) == (200, {"status": "updated"})
        limits = await store.get_limits("user-123")
        assert limits is not None and limits.meters[CLAUDE_INPUT].credited == 1000


async def test_credits_past_64_bits_saturate_and_store(hook: Hook) -> None:
    huge = 2**64
    resp = await hook.send(state_changed(hook.fake, "user-123", huge))
    assert (resp.status_code, resp.json()) == (200, {"status": "updated"})
    limits = await hook.store.get_limits("user-123")
    assert limits is not None
    assert limits.meters[CLAUDE_INPUT] == MeterLimit(
        CLAUDE_INPUT, credited=MAX_CREDITED_UNITS, consumed=10.0, balance=float(MAX_CREDITED_UNITS)
    )


# ---------------------------------------------------------------- webhooks against local-clock refreshes


async def test_a_webhook_older_than_a_refresh_from_a_clock_ahead_still_applies(
    hook: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This machine's clock runs a minute ahead of Polar's: its refresh stamps the snapshot a minute
    "later" than Polar's next webhook, which must not be dropped as stale (a 402 until the next refresh)."""
    real = polar_client.utcnow
    polar = PolarBilling(hook.fake.token, base_url=hook.fake.url, timeout=2.0)
    try:
        hook.fake.set_state("user-123", {CLAUDE_INPUT: (10, 10.0)})  # used up: requests get 402
        with monkeypatch.context() as mp:
            mp.setattr(polar_client, "utcnow", lambda: real() + timedelta(seconds=60))
            refreshed = await polar.customer_limits("user-123")
        assert refreshed is not None and await hook.store.put_limits(refreshed)
    finally:
        await polar.close()
    # Credits bought just after: Polar's webhook carries Polar's (true) time, before the refresh's stamp.
    resp = await hook.send(state_changed(hook.fake, "user-123", 5000, datetime.now(UTC)))
    assert (resp.status_code, resp.json()) == (200, {"status": "refresh_scheduled"})
    deadline = time.monotonic() + 10
    while (limits := await hook.store.get_limits("user-123")) is None or limits.meters[CLAUDE_INPUT].credited == 10:
        assert time.monotonic() < deadline, "the state fetched from Polar was not stored"
        await asyncio.sleep(0.02)
    assert limits.meters[CLAUDE_INPUT].credited == 5000
    assert hook.changed == ["user-123"]


async def test_a_late_webhook_against_a_newer_webhook_stays_stale_without_asking_polar(hook: Hook) -> None:
    t1 = datetime.now(UTC) - timedelta(seconds=30)
    assert (await hook.send(state_changed(hook.fake, "user-123", 2000, t1 + timedelta(seconds=5)))).json() == {
        "status": "updated"
    }
    late = await hook.send(state_changed(hook.fake, "user-123", 1000, t1))
    assert (late.status_code, late.json()) == (200, {"status": "stale"})
    assert not any("/state" in p for p in hook.fake.paths())
    limits = await hook.store.get_limits("user-123")
    assert limits is not None and limits.meters[CLAUDE_INPUT].credited == 2000


# ---------------------------------------------------------------- timestamps ahead of this machine's clock


async def test_a_timestamp_days_ahead_is_invalid_and_cannot_pin_the_limits(
    hook: Hook, caplog: pytest.LogCaptureFixture
) -> None:
    """A delivery stamped far ahead (a bad clock at Polar) would make every later webhook `stale` until then."""
    now = datetime.now(UTC)
    assert (await hook.send(state_changed(hook.fake, "user-123", 1000, now - timedelta(seconds=5)))).json() == {
        "status": "updated"
    }
    with caplog.at_level(logging.INFO, logger="gateway.webhooks"):
        ahead = await hook.send(state_changed(hook.fake, "user-123", 5, now + timedelta(days=2)), msg_id="msg_ahead")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "msg_ahead" in errors[0] and "timestamp" in errors[0]
    assert (ahead.status_code, ahead.json()) == INVALID
    assert view(await hook.store.get_limits("user-123")) == expected(1000, now - timedelta(seconds=5))
    again = await hook.send(state_changed(hook.fake, "user-123", 5, now + timedelta(days=2)), msg_id="msg_ahead")
    assert (again.status_code, again.json()) == (200, {"status": "duplicate"})  # kept claimed
    later = await hook.send(state_changed(hook.fake, "user-123", 2000, now))  # not refused as stale
    assert (later.status_code, later.json()) == (200, {"status": "updated"})
    assert hook.counted == [
        ("customer.state_changed", "updated"),
        ("customer.state_changed", "invalid"),
        ("customer.state_changed", "duplicate"),
        ("customer.state_changed", "updated"),
    ]


async def test_a_timestamp_an_hour_ahead_still_applies(hook: Hook) -> None:
    ts = datetime.now(UTC) + timedelta(hours=1)  # within the bound: Polar's clock may run ahead of this one
    resp = await hook.send(state_changed(hook.fake, "user-123", 1000, ts))
    assert (resp.status_code, resp.json()) == (200, {"status": "updated"})
    assert view(await hook.store.get_limits("user-123")) == expected(1000, ts)


# ---------------------------------------------------------------- forgetting old delivery ids


def age_deliveries(db: Database, like: str, age: timedelta) -> None:
    then = datetime.now(UTC) - age
    db.query(
        "UPDATE webhook_deliveries SET processed_at = ? WHERE webhook_id LIKE ?",
        then if db.is_postgres else iso(then),
        like,
    )


def test_an_app_with_the_secret_and_no_token_prunes_old_deliveries(
    make_gateway: Callable[..., Gateway], databases: Databases
) -> None:
    """Webhooks are claimed whenever the secret is set, so they are pruned then too, not only with a token."""
    db = databases.new("webhooks-only")

    async def claim() -> None:
        store = await open_store(db.url)
        try:
            for n in range(3):
                await store.record_webhook(f"wh_old_{n}", "customer.state_changed")
            await store.record_webhook("wh_new", "customer.state_changed")
        finally:
            await store.close()

    run_async(claim)
    age_deliveries(db, "wh_old_%", timedelta(days=31))
    gw = make_gateway(database_url=db.url, polar_webhook_secret=STANDARD_SECRET)  # no POLAR_ACCESS_TOKEN
    assert gw.services.polar is None
    wait_until(lambda: db.query("SELECT webhook_id FROM webhook_deliveries") == [("wh_new",)])


async def test_prune_forever_prunes_at_start_in_batches_and_stops(store: Store, db: Database) -> None:
    for n in range(5):
        await store.record_webhook(f"wh_old_{n}", "customer.state_changed")
    await store.record_webhook("wh_new", "customer.state_changed")
    age_deliveries(db, "wh_old_%", timedelta(days=31))
    batches: list[int] = []
    real = store.prune_webhooks

    async def counted(older_than: datetime, limit: int) -> int:
        batches.append(await real(older_than, limit))
        return batches[-1]

    store.prune_webhooks = counted  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(prune_forever(store, 30 * 86400.0, stop, every=3600.0, batch=2))
    await poll_until(lambda: len(batches) == 3)
    stop.set()
    await asyncio.wait_for(task, 5)  # not an hour
    assert batches == [2, 2, 1]  # bounded batches, until one comes back short
    assert db.query("SELECT webhook_id FROM webhook_deliveries") == [("wh_new",)]
    assert await store.record_webhook("wh_new", "customer.state_changed") is False  # still deduplicated


class PruneRefusingStore:
    """The store, but its first `prune_webhooks` fails the way a database does."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.refuse = 1

    async def prune_webhooks(self, older_than: datetime, limit: int) -> int:
        if self.refuse:
            self.refuse -= 1
            raise ConnectionResetError("database went away")
        return await self.store.prune_webhooks(older_than, limit)


async def test_a_failing_prune_is_logged_and_retried_next_round(
    store: Store, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    await store.record_webhook("wh_old", "customer.state_changed")
    age_deliveries(db, "wh_old", timedelta(days=31))
    refusing = PruneRefusingStore(store)
    stop = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="gateway.webhooks"):
        task = asyncio.create_task(prune_forever(refusing, 30 * 86400.0, stop, every=0.01))
        await poll_until(lambda: not db.query("SELECT webhook_id FROM webhook_deliveries"))
        stop.set()
        await asyncio.wait_for(task, 5)
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert refusing.refuse == 0 and len(failures) == 1 and "pruning" in failures[0].getMessage()
