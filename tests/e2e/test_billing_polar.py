"""The gateway with Polar configured: usage synced, webhooks change limits, portal links, end to end."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import anthropic
import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.ratelimit.limiter import StoreErrorPolicy
from gateway.settings import RateLimitConfig
from tests.conftest import ADMIN_TOKEN, Gateway, free_port, wait_until
from tests.fakes.polar import FakePolar, new_standard_secret, sign_webhook, webhook_payload
from tests.fakes.upstream import FakeUpstream, Reply
from tests.support_dashboard import signed_in

MSG = [{"role": "user", "content": "Hello"}]
SECRET = new_standard_secret()


@pytest.fixture
def polar() -> Iterator[FakePolar]:
    with FakePolar() as fake:
        yield fake


@pytest.fixture
def polar_gateway(make_gateway: Callable[..., Gateway], polar: FakePolar) -> Callable[..., Gateway]:
    def make(**kw: object) -> Gateway:
        return make_gateway(
            polar_access_token=polar.token,
            polar_base_url=polar.url,
            polar_webhook_secret=SECRET,
            sync_interval_seconds=0.2,
            **kw,
        )

    return make


def refusal_metrics(gw: Gateway) -> dict[tuple[str, str], float]:
    """`gateway_refusals_total` by (status, reason), as /metrics shows it."""
    resp = httpx.get(f"{gw.url}/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert resp.status_code == 200, resp.text
    return {
        (s.labels["status"], s.labels["reason"]): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
        if s.name == "gateway_refusals_total"
    }


def claude(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)


def test_usage_reaches_polar_once_with_meter_names(polar_gateway, polar: FakePolar) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = polar_gateway()
    key = gw.issue_key("alice")
    claude(gw, key).messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)  # type: ignore[arg-type]
    rid = gw.wait_recorded("alice")[0]["id"]
    wait_until(lambda: len(polar.events) == 2)
    assert polar.events[f"{rid}:claude_input_tokens"]["metadata"] == {
        "value": 12,
        "model": "claude-sonnet-4-6",
        "provider": "anthropic",
    }
    assert polar.events[f"{rid}:claude_output_tokens"]["name"] == "claude_output_tokens"
    assert polar.events[f"{rid}:claude_output_tokens"]["external_customer_id"] == "alice"
    wait_until(lambda: gw.query("SELECT COUNT(*) FROM requests WHERE sync_state = 'synced'") == [(1,)])
    assert max(polar.sent.values()) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_fast_priority_usage_reaches_polar_with_its_modifiers(  # type: ignore[no-untyped-def]
    polar_gateway, polar: FakePolar, upstream: FakeUpstream, stream: bool
) -> None:
    """Premium usage can be priced apart: its events say so; an ordinary request's events do not change."""
    gw: Gateway = polar_gateway()
    key = gw.issue_key("frank")
    c = claude(gw, key)
    upstream.enqueue(
        Reply.fixture(f"anthropic/{'stream_fast_priority.sse' if stream else 'message_fast_priority.json'}")
    )
    fast = c.messages.create(model="claude-opus-4-6", max_tokens=32, messages=MSG, stream=stream)  # type: ignore[call-overload]
    if stream:
        assert [e.type for e in fast][-1] == "message_stop"
    else:
        assert fast.usage.speed == "fast" and fast.usage.service_tier == "priority"
    fast_id = gw.wait_recorded("frank")[0]["id"]
    plain = c.messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG, stream=stream)  # type: ignore[call-overload]
    if stream:
        list(plain)
    plain_id = next(r["id"] for r in gw.wait_recorded("frank", 2) if r["id"] != fast_id)

    wait_until(lambda: len(polar.events) == 4)
    inp, out = (14, 11) if not stream else (27, 17)
    modifiers = {"model": "claude-opus-4-6", "provider": "anthropic", "service_tier": "priority", "speed": "fast"}
    assert polar.events[f"{fast_id}:claude_input_tokens"]["metadata"] == {"value": inp, **modifiers}
    assert polar.events[f"{fast_id}:claude_output_tokens"]["metadata"] == {"value": out, **modifiers}
    # the ordinary fixture's `service_tier: "standard"` adds nothing
    inp, out = (12, 9) if not stream else (25, 15)
    plain_meta = {"model": "claude-sonnet-4-6", "provider": "anthropic"}
    assert polar.events[f"{plain_id}:claude_input_tokens"]["metadata"] == {"value": inp, **plain_meta}
    assert polar.events[f"{plain_id}:claude_output_tokens"]["metadata"] == {"value": out, **plain_meta}
    assert max(polar.sent.values()) == 1


def test_requests_served_while_polar_down_then_delivered_once(polar_gateway, polar: FakePolar) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = polar_gateway()
    key = gw.issue_key("bob")
    polar.down(True)
    for _ in range(5):
        claude(gw, key).messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)  # type: ignore[arg-type]
    gw.wait_recorded("bob", 5)
    wait_until(lambda: any(p == "POST /v1/events/ingest" for p in polar.paths()))
    assert polar.events == {}
    assert gw.query("SELECT COUNT(*) FROM requests WHERE sync_state = 'synced'") == [(0,)]
    polar.down(False)
    claude(gw, key).messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)  # type: ignore[arg-type]

    wait_until(lambda: len(polar.events) == 12, timeout=20)  # by itself, after the outage's backoff
    assert polar.total("claude_input_tokens", "bob") == 6 * 12
    assert polar.total("claude_output_tokens", "bob") == 6 * 9


def test_signed_state_change_lifts_402_and_forged_changes_nothing(polar_gateway, polar: FakePolar) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = polar_gateway(plan={"claude_output_tokens": 10})
    key = gw.issue_key("carol")
    c = claude(gw, key)
    c.messages.create(model="claude-sonnet-4-6", max_tokens=9, messages=MSG)  # type: ignore[arg-type]
    gw.wait_recorded("carol")
    with pytest.raises(anthropic.PaymentRequiredError):
        c.messages.create(model="claude-sonnet-4-6", max_tokens=9, messages=MSG)  # type: ignore[arg-type]

    polar.set_state("carol", meters={"claude_output_tokens": (1000, 9.0)})
    payload = webhook_payload("customer.state_changed", polar.state_payload("carol"))
    forged_body, forged_headers = sign_webhook(payload, new_standard_secret(), legacy=False)
    resp = httpx.post(f"{gw.url}/webhooks/polar", content=forged_body, headers=forged_headers)
    assert resp.status_code in (401, 403)
    with pytest.raises(anthropic.PaymentRequiredError):
        c.messages.create(model="claude-sonnet-4-6", max_tokens=9, messages=MSG)  # type: ignore[arg-type]

    body, headers = sign_webhook(payload, SECRET, legacy=False)
    resp = httpx.post(f"{gw.url}/webhooks/polar", content=body, headers=headers)
    assert resp.status_code == 200, resp.text
    c.messages.create(model="claude-sonnet-4-6", max_tokens=9, messages=MSG)  # type: ignore[arg-type]
    status = httpx.get(f"{gw.url}/api/billing/status", headers={"x-api-key": key}).json()
    out = next(m for m in status["meters"] if m["name"] == "claude_output_tokens")
    assert out["credited"] == 1000
    assert status["limits"]["source"] == "polar" and status["limits"]["updatedAt"] is not None
    # a replay of the same delivery is not processed twice
    again = httpx.post(f"{gw.url}/webhooks/polar", content=body, headers=headers)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"


def test_portal_url_from_customer_session(polar_gateway, polar: FakePolar) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = polar_gateway()
    key = gw.issue_key("dave")
    polar.add_customer("dave")
    gw.assert_portal(polar, key, "https://app.example.com/billing")
    assert httpx.get(f"{gw.url}/api/billing/portal").status_code == 401
    bad = httpx.get(f"{gw.url}/api/billing/portal", params={"return_url": "https://"}, headers={"x-api-key": key})
    assert (bad.status_code, bad.json()["error"]["message"]) == (400, "return_url must be an http(s) URL")


def test_portal_sessions_are_limited_per_user_before_polar_is_asked(polar_gateway, polar: FakePolar) -> None:  # type: ignore[no-untyped-def]
    limits = RateLimitConfig(requests_per_minute=None, tokens_per_minute=None, portal_sessions_per_minute=3)
    gw: Gateway = polar_gateway(rate_limit=limits, refusals_flush_seconds=0.05)
    key, other = gw.issue_key("fay"), gw.issue_key("gus")
    polar.add_customer("fay")
    polar.add_customer("gus")
    token = gw.status_token("fay")  # the same user's budget, whichever credential
    answers = [
        httpx.get(f"{gw.url}/api/billing/portal", headers={"authorization": f"Bearer {cred}"})
        for cred in (key, token, key, token)
    ]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    refused = answers[-1]
    assert refused.json() == {
        "error": {"type": "rate_limit_error", "message": "too many billing portal sessions: try again later"}
    }
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert polar.session_calls() == 3  # the refused one never reached Polar
    ok = httpx.get(f"{gw.url}/api/billing/portal", headers={"x-api-key": other})  # another user's own budget
    assert ok.status_code == 200 and polar.session_calls() == 4
    # Counted like every other refusal, under its own reason: in /metrics and in the store (the dashboard's).
    assert refusal_metrics(gw) == {("429", "portal_rate_limited"): 1}
    wait_until(lambda: gw.query("SELECT status, reason, SUM(count) FROM refusals GROUP BY status, reason"))
    rows = gw.query("SELECT status, reason, SUM(count) FROM refusals GROUP BY status, reason")
    assert [(int(st), why, int(n)) for st, why, n in rows] == [(429, "portal_rate_limited", 1)]
    with signed_in(gw) as client:
        table = client.get("/admin").text.split('id="refusals-24h"', 1)[1].split("</table>", 1)[0]
    assert (
        "<td>429</td><td>portal_rate_limited</td><td>too many billing portal links per minute for the user</td>"
        in table
    )


def test_a_portal_limit_that_cannot_be_checked_is_counted_apart(polar_gateway, polar: FakePolar) -> None:  # type: ignore[no-untyped-def]
    # Redis refuses connections and on_store_error is "closed": a 429 that is no user's fault.
    limits = RateLimitConfig(requests_per_minute=None, tokens_per_minute=None, on_store_error=StoreErrorPolicy.CLOSED)
    gw: Gateway = polar_gateway(rate_limit=limits, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    key = gw.issue_key("hal")
    polar.add_customer("hal")
    resp = httpx.get(f"{gw.url}/api/billing/portal", headers={"x-api-key": key}, timeout=10)
    assert resp.status_code == 429 and polar.session_calls() == 0
    assert resp.json() == {
        "error": {
            "type": "rate_limit_error",
            "message": "billing portal links cannot be handed out right now: try again later",
        }
    }
    assert refusal_metrics(gw) == {("429", "portal_unavailable"): 1}


def test_portal_without_polar_is_503(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway()
    key = gw.issue_key("erin")
    resp = httpx.get(f"{gw.url}/api/billing/portal", headers={"x-api-key": key})
    assert resp.status_code == 503
    assert "Polar is not configured" in resp.json()["error"]["message"]


class _UrlCheckingPolar(FakePolar):
    """Polar validates return_url as a pydantic HttpUrl: one with a space in its host is a 422."""

    async def _create_session(self, request: web.Request) -> web.Response:
        body = await request.json()
        if " " in (body.get("return_url") or ""):
            err = {"loc": ["body", "return_url"], "msg": "Input should be a valid URL", "type": "url_parsing"}
            return self._invalid([err])
        return await super()._create_session(request)


def test_portal_return_url_polar_refuses_is_a_400_not_polar_unreachable(
    make_gateway: Callable[..., Gateway],
) -> None:
    with _UrlCheckingPolar() as polar:
        gw = make_gateway(polar_access_token=polar.token, polar_base_url=polar.url)
        key = gw.issue_key("ret")
        polar.add_customer("ret")
        resp = httpx.get(
            f"{gw.url}/api/billing/portal",
            params={"return_url": "https://app example.com/billing"},
            headers={"x-api-key": key},
        )
    # a client error (the url): not "Polar is unreachable right now" (503, retried for ever)
    assert resp.status_code == 400, resp.text
