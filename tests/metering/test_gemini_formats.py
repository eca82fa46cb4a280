"""Gemini requests that ask for several candidates or another response format: reserved for every
candidate, metered in the format Google answers in, or refused."""

from __future__ import annotations

import orjson
import pytest

from gateway.metering import GeminiArrayMeter, usage_from_predict, usage_from_response
from gateway.meters import GEMINI_IMAGES, GEMINI_INPUT, GEMINI_OUTPUT
from gateway.providers.base import InvalidRequest
from gateway.providers.gemini import GeminiProvider


def provider() -> GeminiProvider:
    return GeminiProvider("https://up", "AIza-PROVIDER", default_max_output=4096, images_per_request=4)


def prepare(path: str, body: dict, query: bytes = b""):  # type: ignore[no-untyped-def]
    p = provider()
    route = p.match("POST", path, query)
    assert route is not None
    raw = orjson.dumps(body)
    return p.prepare(route, raw, body)


# maxOutputTokens caps each candidate; candidateCount candidates can all use it.
def test_output_reservation_covers_every_candidate() -> None:
    body = {
        "contents": [{"parts": [{"text": "Hi"}]}],
        "generationConfig": {"maxOutputTokens": 500, "candidateCount": 3},
    }
    call = prepare("/v1beta/models/gemini-2.5-flash:generateContent", body)
    assert call.reservation[GEMINI_OUTPUT] == 3 * 500


def test_output_reservation_default_covers_every_candidate() -> None:
    body = {"contents": [{"parts": [{"text": "Hi"}]}], "generation_config": {"candidate_count": 2}}
    call = prepare("/v1beta/models/gemini-2.5-flash:generateContent", body)
    assert call.reservation[GEMINI_OUTPUT] == 2 * 4096


# The stream mode must follow the real `alt` parameter, not the substring "alt=sse" anywhere in the query.
def test_stream_meter_follows_the_alt_parameter_not_a_substring() -> None:
    body = {"contents": [{"parts": [{"text": "Hi"}]}]}
    call = prepare("/v1beta/models/gemini-2.5-flash:streamGenerateContent", body, b"quotaUser=alt=sse")
    assert call.meter_factory is GeminiArrayMeter  # Google answers with a JSON array: no `alt` parameter


# With several candidates, the first finishReason does not end the response.
def test_first_candidate_finishing_is_not_the_end() -> None:
    body = {"contents": [{"parts": [{"text": "Hi"}]}], "generationConfig": {"candidateCount": 2}}
    call = prepare("/v1beta/models/gemini-2.5-flash:streamGenerateContent", body, b"alt=sse")
    m = call.meter_factory()
    c0 = {
        "candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 3},
    }
    c1 = {
        "candidates": [{"content": {"parts": [{"text": "b"}]}, "index": 1}],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 4},
    }
    m.feed(b"data: " + orjson.dumps(c1) + b"\r\n\r\n")
    m.feed(b"data: " + orjson.dumps(c0) + b"\r\n\r\n")
    assert not m.usage().final
    m.feed(
        b"data: " + orjson.dumps({**c1, "candidates": [{**c1["candidates"][0], "finishReason": "STOP"}]}) + b"\r\n\r\n"
    )
    assert m.usage().final


def test_predict_rai_filtered_not_counted() -> None:
    body = {"predictions": [{"bytesBase64Encoded": "AAAA", "mimeType": "image/png"}, {"raiFilteredReason": "x"}]}
    assert usage_from_predict(orjson.dumps(body)).meters[GEMINI_IMAGES] == 1


def test_multi_candidate_images_counted() -> None:
    img = {"inlineData": {"mimeType": "image/png", "data": "AA"}}
    body = {
        "candidates": [{"content": {"parts": [img]}, "index": 0}, {"content": {"parts": [img]}, "index": 1}],
        "usageMetadata": {
            "promptTokenCount": 3,
            "candidatesTokenCount": 10,
            "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 10}],
        },
    }
    u = usage_from_response(orjson.dumps(body))
    assert u.meters[GEMINI_IMAGES] == 2 and u.meters[GEMINI_OUTPUT] == 0 and u.meters[GEMINI_INPUT] == 3


@pytest.mark.parametrize("query", [b"alt=proto", b"alt=media", b"alt=sse&alt=json", b"$alt=SSE", b"alt=sse"])
def test_a_format_the_meter_cannot_read_is_refused(query: bytes) -> None:
    # (alt=sse on generateContent too: only a stream is metered as SSE)
    path = "/v1beta/models/gemini-2.5-flash:generateContent"
    with pytest.raises(InvalidRequest, match="is not served by the gateway"):
        provider().match("POST", path, query)


def test_json_and_sse_are_served_and_count_tokens_is_not_checked() -> None:
    p = provider()
    stream = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert p.match("POST", stream, b"alt=sse").sse is True  # type: ignore[union-attr]
    assert p.match("POST", stream, b"%24alt=%73se").sse is True  # type: ignore[union-attr]
    assert p.match("POST", stream, b"alt=json").sse is False  # type: ignore[union-attr]
    assert p.match("POST", "/v1beta/models/gemini-2.5-flash:countTokens", b"alt=proto") is not None


def test_a_candidate_finishing_twice_is_not_two_candidates() -> None:
    body = {"contents": [{"parts": [{"text": "Hi"}]}], "generationConfig": {"candidateCount": 2}}
    m = prepare("/v1beta/models/gemini-2.5-flash:streamGenerateContent", body, b"alt=sse").meter_factory()
    done0 = {"candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP", "index": 0}]}
    m.feed(b"data: " + orjson.dumps(done0) + b"\r\n\r\n")
    m.feed(b"data: " + orjson.dumps(done0) + b"\r\n\r\n")
    assert not m.usage().final
    done1 = {"candidates": [{"content": {"parts": [{"text": "b"}]}, "finishReason": "STOP", "index": 1}]}
    m.feed(b"data: " + orjson.dumps(done1) + b"\r\n\r\n")
    assert m.usage().final


# Google reads JSON as proto3 JSON: an int32 field takes a number or a decimal string ("3"), and an integral
# float. Read otherwise, `"candidateCount": "3"` reserved one candidate for three.
@pytest.mark.parametrize(
    ("cfg", "reserved"),
    [
        ({"maxOutputTokens": 500, "candidateCount": "3"}, 3 * 500),
        ({"maxOutputTokens": "500", "candidateCount": "3"}, 3 * 500),
        ({"max_output_tokens": "500", "candidate_count": 3.0}, 3 * 500),
        ({"maxOutputTokens": "500"}, 500),
        ({"maxOutputTokens": "5e2", "candidateCount": "2"}, 2 * 500),
        ({"maxOutputTokens": "lots", "candidateCount": "two"}, 4096),  # not a number: Google refuses it
        ({"maxOutputTokens": 0}, 4096),  # (0 may read as unset, the model's limit: never reserve nothing)
        ({"maxOutputTokens": "-5", "candidateCount": "-2"}, 4096),
    ],
)
def test_counts_are_read_as_google_reads_them(cfg: dict, reserved: int) -> None:
    body = {"contents": [{"parts": [{"text": "Hi"}]}], "generationConfig": cfg}
    call = prepare("/v1beta/models/gemini-2.5-flash:generateContent", body)
    assert call.reservation[GEMINI_OUTPUT] == reserved
