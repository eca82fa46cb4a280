"""Claude images and documents the body does not hold are reserved at their most, through the `anthropic` SDK."""

from __future__ import annotations

import base64
import threading
from typing import Any

import anthropic
import orjson
import pytest

from gateway.settings import ReservationConfig
from tests.conftest import Gateway, wait_until
from tests.fakes.upstream import FakeUpstream, Reply
from tests.metering._images import solid_png

MODEL = "claude-opus-4-7"
PDF = {"type": "document", "source": {"type": "url", "url": "https://example.com/report.pdf"}}
IMAGE = {"type": "image", "source": {"type": "url", "url": "https://example.com/chart.png"}}
TINY_PNG = base64.b64encode(solid_png(2576, 1456)).decode()  # 716 characters for 4,784 visual tokens


def ask(*blocks: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*blocks, {"type": "text", "text": "Summarize it."}]}]


def claude(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)


def test_402_when_the_credit_covers_the_text_but_not_the_image_or_document(  # type: ignore[no-untyped-def]
    make_gateway, upstream: FakeUpstream
) -> None:
    gw: Gateway = make_gateway(plan={"claude_input_tokens": 4000})
    key = gw.issue_key("uma")
    c = claude(gw, key)
    c.messages.create(model=MODEL, max_tokens=16, messages=ask())  # text alone fits: 12 of 4,000 used
    gw.wait_recorded("uma")
    before = len(upstream.requests)
    tiny = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": TINY_PNG}}
    for block, media in ((IMAGE, 4784), (tiny, 4784 - 716 // 2), (PDF, 1_000_000)):
        messages = ask(block)
        with pytest.raises(anthropic.PaymentRequiredError) as err:
            c.messages.create(model=MODEL, max_tokens=16, messages=messages)
        sent = orjson.dumps({"max_tokens": 16, "messages": messages, "model": MODEL})  # the SDK's bytes
        needed = len(sent) // 2 + 16 + media
        error = err.value.body["error"]  # type: ignore[index]
        assert error["type"] == "billing_error" and error["meter"] == "claude_input_tokens"
        assert error["message"] == (
            f"quota for meter claude_input_tokens has 3988 left but this request may use up to {needed}; send less"
            " input (images reserve 4,784 tokens each, documents [reservation] document_input_tokens, server tools"
            " such as web search [reservation] server_tool_input_tokens) or manage billing at /api/billing/portal"
        )
    assert len(upstream.requests) == before  # refused before the provider saw them
    meter = gw.meter(key, "claude_input_tokens")
    assert (meter["consumed"], meter["reserved"]) == (12, 0)


def test_a_document_and_an_image_reserve_their_most_then_settle_to_the_reported_usage(  # type: ignore[no-untyped-def]
    make_gateway, upstream: FakeUpstream
) -> None:
    gw: Gateway = make_gateway(plan={"claude_input_tokens": 1_010_000, "claude_output_tokens": 1000})
    key = gw.issue_key("vic")
    usage = {
        "input_tokens": 23_517,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 57,
    }
    reply = {
        "id": "msg_01MediaAaaaaaaaaaaaaaaaa",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "A ten-page report and a chart."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
    upstream.enqueue(Reply.json(reply, delay_before=1.0))
    done: list[anthropic.types.Message] = []
    worker = threading.Thread(
        target=lambda: done.append(
            claude(gw, key).messages.create(model=MODEL, max_tokens=64, messages=ask(PDF, IMAGE))
        )
    )
    worker.start()
    try:
        sent = upstream.wait_for_requests(1)[-1]
        # In flight: the body by size, the image at its most, the document at the ceiling (the default).
        held = wait_until(lambda: gw.meter(key, "claude_input_tokens")["reserved"])
        assert held == len(sent.body) // 2 + 16 + 4784 + 1_000_000
    finally:
        worker.join(10)
    assert done and done[0].usage.input_tokens == 23_517
    gw.wait_recorded("vic")
    assert gw.events("vic") == {"claude_input_tokens": 23_517, "claude_output_tokens": 57}
    after = gw.meter(key, "claude_input_tokens")
    assert after["consumed"] == 23_517 and after["reserved"] == 0 and after["remaining"] == 1_010_000 - 23_517


def test_the_document_ceiling_is_the_operators_setting(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    # Serving only 200k-context models, say, an operator may lower it: the PDF then fits a smaller credit.
    gw: Gateway = make_gateway(
        plan={"claude_input_tokens": 55_000}, reservation=ReservationConfig(document_input_tokens=50_000)
    )
    key = gw.issue_key("wes")
    msg = claude(gw, key).messages.create(model=MODEL, max_tokens=16, messages=ask(PDF))
    assert msg.usage.input_tokens == 12  # the fake upstream's default reply
    gw.wait_recorded("wes")
    meter = gw.meter(key, "claude_input_tokens")
    assert (meter["consumed"], meter["reserved"]) == (12, 0)
    with pytest.raises(anthropic.PaymentRequiredError):  # 50,000 for the PDF and 4,784 per image: too much
        claude(gw, key).messages.create(model=MODEL, max_tokens=16, messages=ask(PDF, IMAGE, IMAGE))
