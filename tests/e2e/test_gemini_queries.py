"""Gemini queries that hide a format or a key, and several candidates: billed in the format Google
answers in, the key never forwarded, reserved for every candidate."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.conftest import Gateway
from tests.fakes.upstream import FakeUpstream, Reply

BODY = {"contents": [{"parts": [{"text": "Hi"}], "role": "user"}]}


def test_query_naming_alt_sse_in_a_value_is_still_metered(gateway: Gateway, upstream: FakeUpstream) -> None:
    # `quotaUser` is a Google system parameter taking any string: Google streams a JSON array (no `alt`).
    key = gateway.issue_key("quin")
    with httpx.Client(timeout=10) as http:
        resp = http.post(
            f"{gateway.url}/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?quotaUser=alt=sse",
            json=BODY,
            headers={"x-goog-api-key": key},
        )
    assert resp.status_code == 200 and resp.content.startswith(b"[")
    gateway.wait_recorded("quin")
    assert gateway.events("quin") == {"gemini_input_tokens": 8, "gemini_output_tokens": 296}


def test_candidate_count_cannot_spend_past_quota(make_gateway: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    gw = make_gateway(plan={"gemini_output_tokens": 1000})
    key = gw.issue_key("cand")
    cand = {"content": {"parts": [{"text": "x"}], "role": "model"}, "finishReason": "MAX_TOKENS"}
    upstream.enqueue(
        Reply.json(
            {
                "candidates": [{**cand, "index": i} for i in range(3)],
                "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 1800, "totalTokenCount": 1808},
            }
        )
    )
    body = {**BODY, "generationConfig": {"maxOutputTokens": 600, "candidateCount": 3}}
    with httpx.Client(timeout=10) as http:
        resp = http.post(
            f"{gw.url}/gemini/v1beta/models/gemini-2.5-flash:generateContent",
            json=body,
            headers={"x-goog-api-key": key},
        )
    # 3 candidates x 600 tokens may be 1800 > 1000 credited: refused up front, never billed past the quota
    assert resp.status_code == 402, resp.text
    assert upstream.requests == []


def test_percent_encoded_alt_sse_is_metered_as_sse(gateway: Gateway, upstream: FakeUpstream) -> None:
    # `alt=%73se` is `alt=sse` to any URL decoder (Google's, the fake's): an SSE stream comes back.
    key = gateway.issue_key("perc")
    with httpx.Client(timeout=10) as http:
        resp = http.post(
            f"{gateway.url}/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=%73se",
            json=BODY,
            headers={"x-goog-api-key": key},
        )
    assert resp.status_code == 200 and resp.content.startswith(b"data: ")
    gateway.wait_recorded("perc")
    assert gateway.events("perc") == {"gemini_input_tokens": 8, "gemini_output_tokens": 296}


def test_encoded_key_parameter_never_forwarded(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("enc")
    with httpx.Client(timeout=10) as http:
        resp = http.post(
            f"{gateway.url}/gemini/v1beta/models/gemini-2.5-flash:generateContent?%6Bey={key}",
            json=BODY,
            headers={"x-goog-api-key": key},
        )
    assert resp.status_code == 200
    assert key not in upstream.requests[-1].query and key not in upstream.requests[-1].path


def test_a_format_the_meter_cannot_read_is_refused_before_the_provider(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    key = gateway.issue_key("proto")
    with httpx.Client(timeout=10) as http:
        resp = http.post(
            f"{gateway.url}/gemini/v1beta/models/gemini-2.5-flash:generateContent?alt=proto",
            json=BODY,
            headers={"x-goog-api-key": key},
        )
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == ("alt=proto is not served by the gateway: use alt=sse (streams) or JSON")
    assert upstream.requests == []
