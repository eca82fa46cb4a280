"""PolarBilling against FakePolar over loopback with the real polar-sdk (wire format, errors, state)."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from gateway.meters import ALL_METERS, CLAUDE_INPUT, CLAUDE_OUTPUT, GEMINI_IMAGES, GEMINI_INPUT
from gateway.polar.client import (
    BatchRejected,
    CustomerNotFound,
    IngestResult,
    PolarAuthError,
    PolarBilling,
    PolarBillingError,
    RetryableError,
    event_payload,
    limits_from_state,
    valid_user_id,
)
from gateway.polar.commands import polar_setup
from gateway.quota import limits_for
from gateway.settings import Settings
from gateway.store.base import CustomerLimits, MeterLimit, PendingEvent
from tests.fakes.polar import FakePolar

NOW = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
async def polar(fake: FakePolar) -> AsyncIterator[PolarBilling]:
    client = PolarBilling(fake.token, base_url=fake.url, timeout=2.0, ingest_timeout=0.5)
    yield client
    await client.close()


def pending(xid: str, value: int = 1200, ts: datetime = NOW, model: str = "claude-sonnet-4-5") -> PendingEvent:
    return PendingEvent(xid, xid.split(":")[0], "user-123", CLAUDE_INPUT, value, model, "anthropic", ts, 0)


def test_event_payload_is_flat_with_iso_z_timestamp_clamped_into_the_past() -> None:
    assert event_payload(pending("req_1:claude_input_tokens"), NOW + timedelta(hours=1)) == {
        "name": "claude_input_tokens",
        "external_customer_id": "user-123",
        "external_id": "req_1:claude_input_tokens",
        "timestamp": "2026-01-15T12:00:00.000000Z",
        "metadata": {"value": 1200, "model": "claude-sonnet-4-5", "provider": "anthropic"},
    }
    clamped = event_payload(pending("x", ts=NOW + timedelta(minutes=5), model=""), NOW)
    assert clamped["timestamp"] == "2026-01-15T11:59:59.000000Z"
    assert clamped["metadata"] == {"value": 1200, "provider": "anthropic"}


def test_event_payload_carries_the_modifiers_as_strings_clamped_to_polar_rules() -> None:
    fast = replace(pending("req_1:claude_input_tokens"), modifiers=(("speed", "fast"), ("service_tier", "priority")))
    assert event_payload(fast, NOW)["metadata"] == {
        "value": 1200,
        "model": "claude-sonnet-4-5",
        "provider": "anthropic",
        "speed": "fast",
        "service_tier": "priority",
    }
    # Polar 422s a whole batch for a string over 500 characters or an empty one
    odd = replace(pending("x"), modifiers=(("inference_geo", "g" * 501), ("speed", "")))
    assert event_payload(odd, NOW)["metadata"] == {
        "value": 1200,
        "model": "claude-sonnet-4-5",
        "provider": "anthropic",
        "inference_geo": "g" * 500,
    }
    assert event_payload(pending("x"), NOW)["metadata"] == {
        "value": 1200,
        "model": "claude-sonnet-4-5",
        "provider": "anthropic",
    }


def test_valid_user_id() -> None:
    assert valid_user_id("user-123") and valid_user_id("a.b_C-9") and valid_user_id("x" * 128)
    for bad in ("", "a/b", "a b", "a?b", "ü", "x" * 129, ".", "..", "a%2Fb"):
        assert not valid_user_id(bad), bad


async def test_ingest_wire_format_and_dedup(polar: PolarBilling, fake: FakePolar) -> None:
    events = [pending("req_1:claude_input_tokens"), pending("req_2:claude_input_tokens", 7)]
    assert await polar.ingest(events) == IngestResult(inserted=2, duplicates=0)
    assert await polar.ingest(events) == IngestResult(inserted=0, duplicates=2)
    req = fake.requests[0]
    assert (req.method, req.path) == ("POST", "/v1/events/ingest")
    assert req.headers["Authorization"] == f"Bearer {fake.token}"
    assert req.headers["Polar-Version"] == "2026-10"
    assert req.body == {"events": [event_payload(e, datetime.now(UTC)) for e in events]}
    assert fake.total(CLAUDE_INPUT, "user-123") == 1207


async def test_ingest_error_mapping(polar: PolarBilling, fake: FakePolar) -> None:
    events = [pending("a"), pending("b"), pending("c")]
    fake.fail_next(1, 503)
    with pytest.raises(RetryableError) as err:
        await polar.ingest(events)
    assert (err.value.reason, err.value.retry_after) == ("Polar server error 503", None)
    fake.fail_next(1, 429, retry_after=3)
    with pytest.raises(RetryableError) as err:
        await polar.ingest(events)
    assert err.value.retry_after == 3.0
    fake.fail_next(1, "timeout", hold=2.0)
    with pytest.raises(RetryableError, match="network error: ReadTimeout"):
        await polar.ingest(events)
    fake.reject_when(lambda e: e["external_id"] in ("a", "c"))
    with pytest.raises(BatchRejected) as rejected:
        await polar.ingest(events)
    assert rejected.value.bad_indexes == [0, 2]
    assert rejected.value.reasons == {
        0: "metadata: Rejected by test predicate",
        2: "metadata: Rejected by test predicate",
    }
    assert fake.events == {}
    wrong = PolarBilling("polar_oat_SECRET_WRONG", base_url=fake.url)
    try:
        with pytest.raises(PolarAuthError) as auth:
            await wrong.ingest(events)
        assert "SECRET_WRONG" not in str(auth.value) and "SECRET_WRONG" not in repr(wrong)
    finally:
        await wrong.close()


async def test_customer_limits_from_polar_state(polar: PolarBilling, fake: FakePolar) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    end = datetime(2026, 2, 1, tzinfo=UTC)
    state: dict[str, Any] = {
        "meters": {CLAUDE_INPUT: (1_000_000, 1500.0), CLAUDE_OUTPUT: (50_000, 0.0), GEMINI_INPUT: (0, 42.0)},
        "period_start": start,
        "period_end": end,
        "subscription_meters": {GEMINI_INPUT: (0, 42.0), GEMINI_IMAGES: (0, 3.0)},
    }
    fake.set_state("user-123", **state, status="trialing")  # SDK 1.0.2 rejects this without the Status patch
    before = datetime.now(UTC)
    limits = await polar.customer_limits("user-123")
    assert limits is not None
    assert limits.user_id == "user-123"
    credits = {
        CLAUDE_INPUT: MeterLimit(CLAUDE_INPUT, credited=1_000_000, consumed=1500.0, balance=998_500.0),
        CLAUDE_OUTPUT: MeterLimit(CLAUDE_OUTPUT, credited=50_000, consumed=0.0, balance=50_000.0),
    }
    assert limits.meters == credits  # the metered prices bill nothing during the trial: the plan applies
    assert (limits.period_start, limits.period_end, limits.active) == (start, end, True)
    assert before <= limits.snapshot_at <= datetime.now(UTC)
    fake.set_state("user-123", **state)
    paid = await polar.customer_limits("user-123")
    assert paid is not None and paid.meters == {
        **credits,
        GEMINI_INPUT: MeterLimit(GEMINI_INPUT, credited=None, consumed=42.0, balance=-42.0),  # metered price
        GEMINI_IMAGES: MeterLimit(GEMINI_IMAGES, credited=None, consumed=3.0, balance=-3.0),
    }
    assert "GET /v1/customers/external/user-123/state" in fake.paths()
    assert await polar.customer_limits("nobody") is None
    with pytest.raises(ValueError):
        await polar.customer_limits("a/b")


def test_limits_from_state_on_a_realistic_webhook_payload() -> None:
    state = {
        "id": "992fae2a-2a17-4b7a-8d9a-e3b7a6b0b0b1",
        "external_id": "user-123",
        "email": "user@example.com",
        "type": "individual",
        "active_subscriptions": [
            {
                "id": "e514",
                "status": "active",
                "current_period_start": "2026-01-01T00:00:00Z",
                "current_period_end": "2026-02-01T00:00:00Z",
                "cancel_at_period_end": False,
                "meters": [
                    {"id": "s1", "meter_id": "m-out", "consumed_units": 1500.0, "credited_units": 1000, "amount": 25}
                ],
            }
        ],
        "granted_benefits": [{"benefit_type": "meter_credit", "properties": {"last_credited_meter_id": "m-in"}}],
        "active_meters": [
            {"id": "a1", "meter_id": "m-in", "consumed_units": 1500.0, "credited_units": 1000, "balance": -500.0},
            {"id": "a2", "meter_id": "m-out", "consumed_units": 1500.0, "credited_units": 1000, "balance": -500.0},
            {"id": "a3", "meter_id": "m-unknown", "consumed_units": 1.0, "credited_units": 1, "balance": 0.0},
        ],
    }
    names = {"m-in": CLAUDE_INPUT, "m-out": CLAUDE_OUTPUT}
    limits = limits_from_state(state, names, NOW)
    assert limits == CustomerLimits(
        user_id="user-123",
        meters={
            CLAUDE_INPUT: MeterLimit(CLAUDE_INPUT, credited=1000, consumed=1500.0, balance=-500.0),
            CLAUDE_OUTPUT: MeterLimit(CLAUDE_OUTPUT, credited=None, consumed=1500.0, balance=-500.0),
        },
        period_start=datetime(2026, 1, 1, tzinfo=UTC),
        period_end=datetime(2026, 2, 1, tzinfo=UTC),
        snapshot_at=NOW,
        updated_at=limits.updated_at,
        active=True,
    )
    empty = limits_from_state({"external_id": "u", "active_subscriptions": [], "active_meters": []}, names, NOW)
    assert (empty.meters, empty.period_start, empty.period_end, empty.active) == ({}, None, None, True)
    with pytest.raises(ValueError):
        limits_from_state({"external_id": None, "active_meters": []}, names, NOW)


async def test_meters_not_ours_do_not_relist_the_meters_on_every_state(polar: PolarBilling, fake: FakePolar) -> None:
    for user, archived in (("user-1", "an_archived_meter"), ("user-2", "another_archived_meter")):
        others = {"another_products_meter": (0, 5.0), archived: (0, 1.0)}
        fake.set_state(user, meters={CLAUDE_INPUT: (1000, 10.0), **others})
        fake.meters[fake.meter_id(archived)]["archived_at"] = "2026-01-01T00:00:00Z"  # no longer listed
    for _ in range(3):
        for user in ("user-1", "user-2"):
            limits = await polar.customer_limits(user)
            assert limits is not None and set(limits.meters) == {CLAUDE_INPUT}
    assert fake.paths().count("GET /v1/meters/") == 2  # the first state, then one id no listing had


def _state(subscriptions: list[dict[str, object]], active_meters: list[dict[str, object]]) -> dict[str, object]:
    return {"external_id": "user-123", "active_subscriptions": subscriptions, "active_meters": active_meters}


def _sub(status: str, meters: list[dict[str, object]]) -> dict[str, object]:
    period = {"current_period_start": "2026-01-01T00:00:00Z", "current_period_end": "2026-02-01T00:00:00Z"}
    return {"id": "sub", "status": status, **period, "meters": meters}


def _meter(meter_id: str, credited: int, consumed: float) -> dict[str, object]:
    balance = credited - consumed
    return {"meter_id": meter_id, "credited_units": credited, "consumed_units": consumed, "balance": balance}


def test_a_meter_polar_neither_prices_nor_credits_is_left_to_the_plan() -> None:
    # A Polar customer on the free plan: Polar lists a customer meter (credited 0) once the first
    # event for it arrives. That must not turn the plan's allowance into a limit of 0.
    names = {"m-in": CLAUDE_INPUT, "m-out": CLAUDE_OUTPUT}
    plan = {CLAUDE_INPUT: 5000, CLAUDE_OUTPUT: 100}
    before_first_event = limits_from_state(_state([], [_meter("m-out", 500, 0.0)]), names, NOW)
    after_first_event = limits_from_state(
        _state([], [_meter("m-in", 0, 1200.0), _meter("m-out", 500, 0.0)]), names, NOW
    )
    for limits in (before_first_event, after_first_event):
        assert limits.meters == {CLAUDE_OUTPUT: MeterLimit(CLAUDE_OUTPUT, credited=500, consumed=0.0, balance=500.0)}
        assert limits_for(plan, limits, NOW)[2] == {CLAUDE_INPUT: 5000, CLAUDE_OUTPUT: 500}


def test_a_trial_bills_no_usage_so_its_metered_meters_are_limited_like_unpriced_ones() -> None:
    # Polar bills no usage ingested during a trial: a metered price then means nothing is paid for,
    # so the meter is limited to its credits (else the plan), not unlimited.
    names = {"m-in": CLAUDE_INPUT, "m-out": CLAUDE_OUTPUT}
    plan = {CLAUDE_INPUT: 5000, CLAUDE_OUTPUT: 100}
    metered = [_meter("m-in", 1000, 10.0), _meter("m-out", 0, 20.0)]
    customer_meters = [_meter("m-in", 1000, 10.0), _meter("m-out", 0, 20.0)]
    trial = limits_from_state(_state([_sub("trialing", metered)], customer_meters), names, NOW)
    assert trial.meters == {CLAUDE_INPUT: MeterLimit(CLAUDE_INPUT, credited=1000, consumed=10.0, balance=990.0)}
    assert limits_for(plan, trial, NOW)[2] == {CLAUDE_INPUT: 1000, CLAUDE_OUTPUT: 100}
    paid = limits_from_state(_state([_sub("active", metered)], customer_meters), names, NOW)
    assert limits_for(plan, paid, NOW)[2] == {CLAUDE_INPUT: None, CLAUDE_OUTPUT: None}
    both = limits_from_state(_state([_sub("trialing", metered), _sub("active", metered)], customer_meters), names, NOW)
    assert limits_for(plan, both, NOW)[2] == {CLAUDE_INPUT: None, CLAUDE_OUTPUT: None}


async def test_portal_url_is_the_sessions_customer_portal_url(polar: PolarBilling, fake: FakePolar) -> None:
    fake.add_customer("user-123")
    url = await polar.portal_url("user-123", "https://app.example.com/billing")
    assert url == fake.sessions[-1]["customer_portal_url"]
    assert url.startswith("https://sandbox.polar.sh/org/portal?customer_session_token=polar_cst_")
    req = fake.requests[-1]
    assert (req.method, req.path) == ("POST", "/v1/customer-sessions/")
    assert req.body == {"external_customer_id": "user-123", "return_url": "https://app.example.com/billing"}
    with pytest.raises(CustomerNotFound):
        await polar.portal_url("nobody")


async def test_ensure_customer_creates_once(polar: PolarBilling, fake: FakePolar) -> None:
    assert await polar.ensure_customer("user-9", "u9@example.com") is True
    assert await polar.ensure_customer("user-9", "u9@example.com") is False
    assert fake.customers["user-9"]["email"] == "u9@example.com"
    assert fake.paths() == [
        "GET /v1/customers/external/user-9",
        "POST /v1/customers/",
        "GET /v1/customers/external/user-9",
    ]


async def test_setup_meters_is_idempotent(polar: PolarBilling, fake: FakePolar) -> None:
    first = await polar.setup_meters()
    assert [(name, created) for name, _, created in first] == [(m, True) for m in ALL_METERS]
    by_name = {m["name"]: m for m in fake.meters.values()}
    assert by_name[GEMINI_IMAGES]["aggregation"] == {"func": "count"}
    assert by_name[GEMINI_IMAGES]["unit"] == "scalar"
    assert by_name[CLAUDE_INPUT]["aggregation"] == {"func": "sum", "property": "value"}
    assert by_name[CLAUDE_INPUT]["unit"] == "token"
    assert by_name[CLAUDE_INPUT]["filter"] == {
        "conjunction": "and",
        "clauses": [{"property": "name", "operator": "eq", "value": CLAUDE_INPUT}],
    }
    n_requests = len(fake.requests)
    second = await polar.setup_meters()
    assert second == [(name, meter_id, False) for name, meter_id, _ in first]
    assert [f"{r.method} {r.path}" for r in fake.requests[n_requests:]] == ["GET /v1/meters/"]
    assert len(fake.meters) == len(ALL_METERS)
    assert await polar.meter_names() == {meter_id: name for name, meter_id, _ in first}


async def test_polar_setup_cli(fake: FakePolar) -> None:
    out = io.StringIO()
    assert await polar_setup(Settings(), out=out) == 2
    assert "POLAR_ACCESS_TOKEN" in out.getvalue()
    out = io.StringIO()
    assert await polar_setup(Settings(polar_access_token=fake.token, polar_base_url=fake.url), out=out) == 0
    created = [line for line in out.getvalue().splitlines() if line.startswith("created")]
    assert len(created) == len(ALL_METERS)
    out = io.StringIO()
    assert await polar_setup(Settings(polar_access_token=fake.token, polar_base_url=fake.url), out=out) == 0
    assert sum(line.startswith("exists") for line in out.getvalue().splitlines()) == len(ALL_METERS)


class StrictUrlPolar(FakePolar):
    """Polar validates return_url as a pydantic HttpUrl: a URL without a host is a 422 on return_url."""

    async def _create_session(self, request: web.Request) -> web.Response:
        body = await request.json()
        url = body.get("return_url")
        if url is not None and url.split("://", 1)[-1] in ("", "/"):
            msg = "Input should be a valid URL, empty host"
            return self._invalid([{"loc": ["body", "return_url"], "msg": msg, "type": "url_parsing"}])
        return await super()._create_session(request)


async def test_portal_bad_return_url_is_not_reported_as_an_unknown_customer() -> None:
    with StrictUrlPolar() as fake:
        fake.add_customer("user-1")
        client = PolarBilling(fake.token, base_url=fake.url, timeout=2.0)
        try:
            assert (await client.portal_url("user-1", "https://app.example.com/b")).startswith("https://")
            with pytest.raises(PolarBillingError) as err:
                await client.portal_url("user-1", "https://")  # passes the endpoint's prefix check
            assert not isinstance(err.value, CustomerNotFound), str(err.value)
            with pytest.raises(CustomerNotFound):
                await client.portal_url("nobody")
        finally:
            await client.close()
