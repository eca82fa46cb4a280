"""Gemini files, media, images and server tools' results the body does not bound are reserved at their most,
through `google-genai`."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from typing import Any

import pytest
from google import genai
from google.genai import errors, types

from gateway.settings import ReservationConfig
from tests.conftest import Gateway, wait_until
from tests.fakes.upstream import FakeUpstream, Reply
from tests.metering._images import solid_png

MODEL = "gemini-2.5-flash"
DOCS = 2_097_152  # `[reservation] gemini_document_input_tokens`, the default
TOOLS = 2_097_152  # `[reservation] gemini_server_tool_input_tokens`, the default
FILE_URI = "https://generativelanguage.googleapis.com/v1beta/files/v1d30"
VIDEO = types.Part.from_uri(file_uri=FILE_URI, mime_type="video/mp4")
TINY_PNG = solid_png(3072, 3072)  # 1.2 kB for 16 tiles of 258 tokens: 4,128


def client(gw: Gateway, key: str) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=f"{gw.url}/gemini"))


def ask(*parts: types.Part) -> list[Any]:
    return [*parts, "Summarize it."]


# The 402 hint for gemini_input_tokens: what a client can change to fit the reservation.
INPUT_HINT = (
    "send less input (inline images reserve 4,128 tokens each; files, audio, video, PDFs [reservation]"
    " gemini_document_input_tokens; server tools such as Google Search and URL context [reservation]"
    " gemini_server_tool_input_tokens) or manage billing at /api/billing/portal"
)


def refusal(call: Callable[[], object]) -> dict[str, Any]:
    """The error of a 402 the gateway answered in Gemini's shape (google-genai raises a ClientError)."""
    with pytest.raises(errors.ClientError) as err:
        call()
    assert err.value.code == 402 and err.value.status == "FAILED_PRECONDITION"
    error: dict[str, Any] = err.value.details["error"]
    return error


def test_402_when_the_credit_covers_the_text_but_not_a_file_or_an_image(  # type: ignore[no-untyped-def]
    make_gateway, upstream: FakeUpstream
) -> None:
    gw: Gateway = make_gateway(plan={"gemini_input_tokens": 4000})
    key = gw.issue_key("fay")
    gc = client(gw, key)
    gc.models.generate_content(model=MODEL, contents="Hello")  # text alone fits: 8 of 4,000 used
    gw.wait_recorded("fay")
    # The same requests through a gateway without a plan show the bytes the SDK sends.
    free = make_gateway()
    rich = client(free, free.issue_key("gil"))
    image = types.Part.from_bytes(data=TINY_PNG, mime_type="image/png")
    sent = []
    for part in (VIDEO, image):
        rich.models.generate_content(model=MODEL, contents=ask(part))
        sent.append(upstream.requests[-1].body)
    before = len(upstream.requests)
    data = len(base64.b64encode(TINY_PNG))
    for part, body, media in ((VIDEO, sent[0], DOCS), (image, sent[1], 4128 - data // 2)):
        error = refusal(lambda part=part: gc.models.generate_content(model=MODEL, contents=ask(part)))
        needed = len(body) // 2 + 16 + media
        assert error["meter"] == "gemini_input_tokens"
        assert error["message"] == (
            f"quota for meter gemini_input_tokens has 3992 left but this request may use up to {needed}; {INPUT_HINT}"
        )
    assert len(upstream.requests) == before  # refused before the provider saw them
    meter = gw.meter(key, "gemini_input_tokens")
    assert (meter["consumed"], meter["reserved"]) == (8, 0)


def test_a_file_reserves_the_ceiling_then_settles_to_the_reported_usage(  # type: ignore[no-untyped-def]
    make_gateway, upstream: FakeUpstream
) -> None:
    gw: Gateway = make_gateway(plan={"gemini_input_tokens": 2_200_000, "gemini_output_tokens": 1000})
    key = gw.issue_key("hal")
    usage = {
        "promptTokenCount": 95_012,
        "candidatesTokenCount": 41,
        "totalTokenCount": 95_053,
        "promptTokensDetails": [{"modality": "VIDEO", "tokenCount": 94_994}, {"modality": "TEXT", "tokenCount": 18}],
    }
    reply = {
        "candidates": [
            {"content": {"parts": [{"text": "A six-minute lecture."}], "role": "model"}, "finishReason": "STOP"}
        ],
        "usageMetadata": usage,
        "modelVersion": MODEL,
        "responseId": "mEdiA1aaaaaaaaaaaaaaaaaa",
    }
    upstream.enqueue(Reply.json(reply, delay_before=1.0))
    done: list[types.GenerateContentResponse] = []
    gc, config = client(gw, key), types.GenerateContentConfig(max_output_tokens=64)
    worker = threading.Thread(
        target=lambda: done.append(gc.models.generate_content(model=MODEL, contents=ask(VIDEO), config=config))
    )
    worker.start()
    try:
        sent = upstream.wait_for_requests(1)[-1]
        # (google-genai 3.x mixes casings: `fileData` holding `file_uri` and `mime_type`)
        assert sent.json()["contents"][0]["parts"][0]["fileData"]["file_uri"].endswith("/files/v1d30")
        # In flight: the body by size and the file at the ceiling (the default).
        held = wait_until(lambda: gw.meter(key, "gemini_input_tokens")["reserved"])
        assert held == len(sent.body) // 2 + 16 + DOCS
    finally:
        worker.join(10)
    assert done and done[0].usage_metadata is not None and done[0].usage_metadata.prompt_token_count == 95_012
    gw.wait_recorded("hal")
    assert gw.events("hal") == {"gemini_input_tokens": 95_012, "gemini_output_tokens": 41}
    after = gw.meter(key, "gemini_input_tokens")
    assert after["consumed"] == 95_012 and after["reserved"] == 0 and after["remaining"] == 2_200_000 - 95_012


def test_the_gemini_ceiling_is_the_operators_setting(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    # Serving only 1M-context models, an operator may lower it: a file then fits a smaller credit.
    gw: Gateway = make_gateway(
        plan={"gemini_input_tokens": 1_100_000}, reservation=ReservationConfig(gemini_document_input_tokens=1_048_576)
    )
    key = gw.issue_key("ida")
    gc = client(gw, key)
    resp = gc.models.generate_content(model=MODEL, contents=ask(VIDEO))
    assert resp.usage_metadata is not None and resp.usage_metadata.prompt_token_count == 8  # the fake's default
    gw.wait_recorded("ida")
    meter = gw.meter(key, "gemini_input_tokens")
    assert (meter["consumed"], meter["reserved"]) == (8, 0)


def test_a_cached_content_needs_cached_credit_for_the_ceiling(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(plan={"gemini_cached_tokens": 1_000_000})
    key = gw.issue_key("jon")
    gc = client(gw, key)
    gc.models.generate_content(model=MODEL, contents="Hello")  # no cache named: the body bounds it
    gw.wait_recorded("jon")
    before = len(upstream.requests)
    config = types.GenerateContentConfig(cached_content="cachedContents/lecture-notes")
    error = refusal(lambda: gc.models.generate_content(model=MODEL, contents="Summarize the lecture.", config=config))
    assert error["meter"] == "gemini_cached_tokens"
    assert error["message"] == (
        f"quota for meter gemini_cached_tokens has 1000000 left but this request may use up to {DOCS}; send less"
        " input (inline images reserve 4,128 tokens each; files, audio, video, PDFs and a cachedContent"
        " [reservation] gemini_document_input_tokens; server tools such as Google Search and URL context"
        " [reservation] gemini_server_tool_input_tokens) or manage billing at /api/billing/portal"
    )
    assert len(upstream.requests) == before  # refused before the provider saw it
    # With the credit for it, it is served and settles to what the provider reports.
    gw2: Gateway = make_gateway(plan={"gemini_cached_tokens": 3_000_000})
    key2 = gw2.issue_key("kim")
    usage = {"promptTokenCount": 120_010, "cachedContentTokenCount": 120_000, "candidatesTokenCount": 5}
    reply = {
        "candidates": [{"content": {"parts": [{"text": "It covers tides."}], "role": "model"}, "finishReason": "STOP"}],
        "usageMetadata": {**usage, "totalTokenCount": 120_015},
        "modelVersion": MODEL,
        "responseId": "cAcHeDaaaaaaaaaaaaaaaaaa",
    }
    upstream.enqueue(Reply.json(reply))
    gc2 = client(gw2, key2)  # (kept: a collected client closes its connections under the call)
    resp = gc2.models.generate_content(model=MODEL, contents="Summarize the lecture.", config=config)
    assert upstream.requests[-1].json()["cachedContent"] == "cachedContents/lecture-notes"
    assert resp.usage_metadata is not None and resp.usage_metadata.cached_content_token_count == 120_000
    gw2.wait_recorded("kim")
    assert gw2.events("kim") == {"gemini_input_tokens": 10, "gemini_cached_tokens": 120_000, "gemini_output_tokens": 5}
    meter = gw2.meter(key2, "gemini_cached_tokens")
    assert (meter["consumed"], meter["reserved"]) == (120_000, 0)


def test_google_search_needs_input_credit_for_the_server_tool_ceiling(  # type: ignore[no-untyped-def]
    make_gateway, upstream: FakeUpstream
) -> None:
    # What the search feeds back is billed as input (`toolUsePromptTokenCount`), bounded by nothing in the
    # body: the request reserves [reservation] gemini_server_tool_input_tokens once beyond its body.
    config = types.GenerateContentConfig(tools=[types.Tool(google_search=types.GoogleSearch())], max_output_tokens=64)
    question = "Who won the last Tour de France?"
    free = make_gateway()  # the bytes the SDK sends, through a gateway without a plan
    rich = client(free, free.issue_key("lea"))  # (kept: a collected client closes its connections under the call)
    rich.models.generate_content(model=MODEL, contents=question, config=config)
    sent = upstream.requests[-1]
    assert sent.json()["tools"] == [{"googleSearch": {}}]
    needed = len(sent.body) // 2 + 16 + TOOLS
    gw: Gateway = make_gateway(plan={"gemini_input_tokens": 2_000_000})
    key = gw.issue_key("lou")
    before = len(upstream.requests)
    gc = client(gw, key)
    error = refusal(lambda: gc.models.generate_content(model=MODEL, contents=question, config=config))
    assert error["meter"] == "gemini_input_tokens"
    assert error["message"] == (
        f"quota for meter gemini_input_tokens has 2000000 left but this request may use up to {needed}; {INPUT_HINT}"
    )
    assert len(upstream.requests) == before  # refused before the provider saw it
    meter = gw.meter(key, "gemini_input_tokens")
    assert (meter["consumed"], meter["reserved"]) == (0, 0)

    # With the credit for the ceiling it is served, holds the ceiling in flight and settles to the usage.
    gw2: Gateway = make_gateway(plan={"gemini_input_tokens": 2_200_000, "gemini_output_tokens": 1000})
    key2 = gw2.issue_key("max")
    usage = {"promptTokenCount": 9, "toolUsePromptTokenCount": 31_400, "candidatesTokenCount": 60}
    reply = {
        "candidates": [
            {"content": {"parts": [{"text": "Tadej Pogacar won it."}], "role": "model"}, "finishReason": "STOP"}
        ],
        "usageMetadata": {**usage, "totalTokenCount": 31_469},
        "modelVersion": MODEL,
        "responseId": "gRoUnDaaaaaaaaaaaaaaaaaa",
    }
    upstream.enqueue(Reply.json(reply, delay_before=1.0))
    done: list[types.GenerateContentResponse] = []
    gc2 = client(gw2, key2)
    worker = threading.Thread(
        target=lambda: done.append(gc2.models.generate_content(model=MODEL, contents=question, config=config))
    )
    worker.start()
    try:
        assert upstream.wait_for_requests(before + 1)[-1].body == sent.body
        held = wait_until(lambda: gw2.meter(key2, "gemini_input_tokens")["reserved"])
        assert held == needed
    finally:
        worker.join(10)
    assert done and done[0].usage_metadata is not None
    assert done[0].usage_metadata.tool_use_prompt_token_count == 31_400
    gw2.wait_recorded("max")
    assert gw2.events("max") == {"gemini_input_tokens": 9 + 31_400, "gemini_output_tokens": 60}
    after = gw2.meter(key2, "gemini_input_tokens")
    assert (after["consumed"], after["reserved"], after["remaining"]) == (31_409, 0, 2_200_000 - 31_409)
