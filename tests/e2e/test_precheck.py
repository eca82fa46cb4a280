"""Pre-checks: 402 on exhausted quota and 429 on rate limits, in each provider's error shape."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from google import genai
from google.genai import errors, types

from gateway.settings import RateLimitConfig
from tests.conftest import Gateway
from tests.fakes.upstream import FakeUpstream

MSG = [{"role": "user", "content": "Hello"}]


def claude(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)


def test_402_when_quota_used_up_anthropic(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(plan={"claude_output_tokens": 70})
    key = gw.issue_key("pat")
    c = claude(gw, key)
    c.messages.create(model="claude-sonnet-4-6", max_tokens=30, messages=MSG)  # uses 9 of 70
    gw.wait_recorded("pat")
    c.messages.create(model="claude-sonnet-4-6", max_tokens=30, messages=MSG)  # 18 of 70
    gw.wait_recorded("pat", 2)
    before = len(upstream.requests)
    with pytest.raises(anthropic.PaymentRequiredError) as err:
        c.messages.create(model="claude-sonnet-4-6", max_tokens=60, messages=MSG)  # 60 > 52 left
    assert err.value.status_code == 402
    body = err.value.body
    assert body["error"]["type"] == "billing_error"  # type: ignore[index]
    assert body["error"]["meter"] == "claude_output_tokens"  # type: ignore[index]
    assert body["error"]["portal_url"] == "/api/billing/portal"  # type: ignore[index]
    assert "claude_output_tokens" in body["error"]["message"]  # type: ignore[index]
    assert len(upstream.requests) == before
    # A request that fits still passes; once none fits, every request is refused.
    c.messages.create(model="claude-sonnet-4-6", max_tokens=52, messages=MSG)
    gw.wait_recorded("pat", 3)
    assert gw.events("pat")["claude_output_tokens"] == 27


def test_402_when_exhausted_gemini(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(plan={"gemini_output_tokens": 300})
    key = gw.issue_key("quinn")
    c = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=f"{gw.url}/gemini"))
    cfg = types.GenerateContentConfig(max_output_tokens=300)
    c.models.generate_content(model="gemini-2.5-flash", contents="Hi", config=cfg)  # 294 of 300
    gw.wait_recorded("quinn")
    before = len(upstream.requests)
    with pytest.raises(errors.ClientError) as err:
        c.models.generate_content(model="gemini-2.5-flash", contents="Hi", config=cfg)
    assert err.value.code == 402
    assert "gemini_output_tokens" in (err.value.message or "")
    assert err.value.details["error"]["portal_url"] == "/api/billing/portal"
    assert len(upstream.requests) == before
    status = httpx.get(f"{gw.url}/api/billing/status", headers={"authorization": f"Bearer {key}"}).json()
    out = next(m for m in status["meters"] if m["name"] == "gemini_output_tokens")
    assert out == {
        "name": "gemini_output_tokens",
        "consumed": 294,
        "reserved": 0,
        "credited": 300,
        "remaining": 6,
        "percentUsed": 98.0,
        "status": "critical",
    }


def test_429_requests_per_minute_with_retry_after(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(rate_limit=RateLimitConfig(requests_per_minute=3, tokens_per_minute=None))
    key = gw.issue_key("rita")
    c = claude(gw, key)
    for _ in range(3):
        c.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=MSG)
    before = len(upstream.requests)
    with pytest.raises(anthropic.RateLimitError) as err:
        c.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=MSG)
    retry_after = int(err.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert err.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    g = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=f"{gw.url}/gemini"))
    with pytest.raises(errors.ClientError) as gerr:
        g.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    assert gerr.value.code == 429 and gerr.value.status == "RESOURCE_EXHAUSTED"
    assert len(upstream.requests) == before
    # another user is not affected
    claude(gw, gw.issue_key("sam")).messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=MSG)


def test_429_tokens_per_minute(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(rate_limit=RateLimitConfig(requests_per_minute=None, tokens_per_minute=200))
    c = claude(gw, gw.issue_key("tom"))
    c.messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=MSG)  # reserves ~150, settles to 21
    gw.wait_recorded("tom")
    c.messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=MSG)
    gw.wait_recorded("tom", 2)
    with pytest.raises(anthropic.RateLimitError):
        c.messages.create(model="claude-sonnet-4-6", max_tokens=190, messages=MSG)


def test_status_endpoint_shape_and_auth(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(plan={"claude_input_tokens": 100, "claude_output_tokens": 10})
    key = gw.issue_key("uma")
    assert httpx.get(f"{gw.url}/api/billing/status").status_code == 401
    assert httpx.get(f"{gw.url}/api/billing/status", headers={"x-api-key": "pgw_nope"}).status_code == 401
    claude(gw, key).messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=MSG)
    gw.wait_recorded("uma")
    data = httpx.get(f"{gw.url}/api/billing/status", headers={"x-api-key": key}).json()
    assert data["status"] == "critical"
    meters = {m["name"]: m for m in data["meters"]}
    assert meters["claude_input_tokens"] == {
        "name": "claude_input_tokens",
        "consumed": 12,
        "reserved": 0,
        "credited": 100,
        "remaining": 88,
        "percentUsed": 12.0,
        "status": "ok",
    }
    assert meters["claude_output_tokens"]["percentUsed"] == 90.0
    assert meters["claude_output_tokens"]["status"] == "critical"
    assert meters["gemini_images"]["credited"] is None and meters["gemini_images"]["status"] == "ok"
    assert data["period"]["start"].endswith("T00:00:00.000000Z")
    # 1 output token left, the request may use 8: refused before the upstream
    with pytest.raises(anthropic.PaymentRequiredError):
        claude(gw, key).messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=MSG)
