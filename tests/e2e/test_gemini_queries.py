"""Gemini queries that hide a format or a key, and several candidates: billed in the format Google
answers in, the key never forwarded, reserved for every candidate."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Gateway
from tests.fakes.upstream import FakeUpstream, Reply

BODY = {"contents": [{"parts": [{"text": "Hi"}], "role": "user"}]}


def _post(gw: Gateway, key: str, call: str, body: object = BODY) -> httpx.Response:
    """POST gemini-2.5-flash's `call` (method and query) through the gateway with `key`."""
    with httpx.Client(timeout=10) as http:
        return http.post(
            f"{gw.url}/gemini/v1beta/models/gemini-2.5-flash:{call}", json=body, headers={"x-goog-api-key": key}
        )


@pytest.mark.parametrize(
    ("call", "answer"),
    [
        # `quotaUser` takes any string: no `alt`, so Google streams a JSON array (it was read as SSE: 0 billed)
        ("streamGenerateContent?quotaUser=alt=sse", b"["),
        # `%73` is `s` to any URL decoder: SSE comes back (it was read as an array: one chunk billed)
        ("streamGenerateContent?alt=%73se", b"data: "),
    ],
)
def test_a_stream_is_metered_in_the_format_google_answers_in(gateway: Gateway, call: str, answer: bytes) -> None:
    key = gateway.issue_key("fmt")
    resp = _post(gateway, key, call)
    assert resp.status_code == 200 and resp.content.startswith(answer)
    gateway.wait_recorded("fmt")
    assert gateway.events("fmt") == {"gemini_input_tokens": 8, "gemini_output_tokens": 296}


# (Google reads proto3 JSON: "3" is 3 candidates too; read as none, it reserved one)
@pytest.mark.parametrize("count", [3, "3"])
def test_candidate_count_cannot_spend_past_quota(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream, count: object
) -> None:
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
    body = {**BODY, "generationConfig": {"maxOutputTokens": 600, "candidateCount": count}}
    resp = _post(gw, key, "generateContent", body)
    # 3 candidates x 600 tokens may be 1800 > 1000 credited: refused up front, never billed past the quota
    assert resp.status_code == 402, resp.text
    assert upstream.requests == []


def test_encoded_key_parameter_never_forwarded(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("enc")
    resp = _post(gateway, key, "generateContent?%6Bey={key}", BODY)
    assert resp.status_code == 200
    assert key not in upstream.requests[-1].query and key not in upstream.requests[-1].path


def test_a_format_the_meter_cannot_read_is_refused_before_the_provider(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    key = gateway.issue_key("proto")
    resp = _post(gateway, key, "generateContent?alt=proto", BODY)
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == ("alt=proto is not served by the gateway: use alt=sse (streams) or JSON")
    assert upstream.requests == []


def test_google_rest_clients_json_with_enum_encoding_is_served(gateway: Gateway) -> None:
    # google-generativeai (transport="rest") and every generated Google REST client send
    # `$alt=json;enum-encoding=int`: a JSON answer, metered as such (it was refused 400 for a moment).
    key = gateway.issue_key("gapic")
    for call in ("generateContent", "streamGenerateContent"):
        resp = _post(gateway, key, f"{call}?%24alt=json%3Benum-encoding%3Dint")
        assert resp.status_code == 200, resp.text
    gateway.wait_recorded("gapic", n=2)
    # (the JSON fixture bills 8 + 294, the JSON-array stream 8 + 296)
    assert gateway.events("gapic") == {"gemini_input_tokens": 8 + 8, "gemini_output_tokens": 294 + 296}


def test_no_output_cap_reserves_what_google_lets_the_model_write(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    # Without maxOutputTokens Google lets the model write up to its own limit (65,536 on Gemini 2.5 and 3,
    # thinking included): 4,096 reserved let this request bill 50,000 against 10,000 credited.
    gw = make_gateway(plan={"gemini_output_tokens": 10_000})
    key = gw.issue_key("nocap")
    upstream.enqueue(
        Reply.json(
            {
                "candidates": [{"content": {"parts": [{"text": "x"}], "role": "model"}, "finishReason": "STOP"}],
                "usageMetadata": {
                    "promptTokenCount": 8,
                    "candidatesTokenCount": 30_000,
                    "thoughtsTokenCount": 20_000,
                    "totalTokenCount": 50_008,
                },
            }
        )
    )
    resp = _post(gw, key, "generateContent")
    assert resp.status_code == 402, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["status"], error["meter"]) == (402, "FAILED_PRECONDITION", "gemini_output_tokens")
    assert error["message"] == (
        "quota for meter gemini_output_tokens has 10000 left but this request may use up to 65536; "
        "set a lower maxOutputTokens or manage billing at /api/billing/portal"
    )
    assert upstream.requests == []
    upstream.reset()
    # With a cap that fits it is served (the default reply: 8 in, 9 + 285 out) and billed as reported.
    resp = _post(gw, key, "generateContent", {**BODY, "generationConfig": {"maxOutputTokens": 9000}})
    assert resp.status_code == 200, resp.text
    gw.wait_recorded("nocap")
    assert gw.events("nocap") == {"gemini_input_tokens": 8, "gemini_output_tokens": 294}


def test_image_tokens_in_integer_enums_are_billed_once(gateway: Gateway, upstream: FakeUpstream) -> None:
    # With `enum-encoding=int` Google writes the modality as its number (IMAGE = 2): the image's 1,290 tokens
    # were billed as output tokens as well as the image itself.
    key = gateway.issue_key("enum-img")
    image = {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}
    upstream.enqueue(
        Reply.json(
            {
                "candidates": [{"content": {"parts": [{"text": "Here."}, image], "role": "model"}, "finishReason": 1}],
                "usageMetadata": {
                    "promptTokenCount": 7,
                    "candidatesTokenCount": 1300,
                    "totalTokenCount": 1307,
                    "candidatesTokensDetails": [{"modality": 2, "tokenCount": 1290}, {"modality": 1, "tokenCount": 10}],
                },
            }
        )
    )
    body = {
        "contents": [{"parts": [{"text": "A red square"}], "role": "user"}],
        "generationConfig": {"responseModalities": [1, 2]},
    }
    with httpx.Client(timeout=10) as http:
        resp = http.post(
            f"{gateway.url}/gemini/v1beta/models/gemini-2.5-flash-image:generateContent?%24alt=json%3Benum-encoding%3Dint",
            json=body,
            headers={"x-goog-api-key": key},
        )
    assert resp.status_code == 200, resp.text
    gateway.wait_recorded("enum-img")
    assert gateway.events("enum-img") == {"gemini_input_tokens": 7, "gemini_output_tokens": 10, "gemini_images": 1}
