"""Absurd numbers from a client or a provider: bounded where they are reserved and billed, never a 500,
a lost request, a stuck recorder or a store refusing the user's usage."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from gateway.meters import MAX_TOKENS_PER_REQUEST, MAX_UNITS_PER_REQUEST
from tests.conftest import Gateway, GatewayProcess, process_env
from tests.fakes.upstream import FakeUpstream, Reply
from tests.support_db import Databases

MSG = [{"role": "user", "content": "Hi"}]
U64 = 2**64 - 1
GEMINI = "/gemini/v1beta/models/gemini-2.5-flash:generateContent"


def claude_message(usage: str) -> Reply:
    body = (
        '{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-6",'
        '"content":[{"type":"text","text":"Hi"}],"stop_reason":"end_turn","stop_sequence":null,"usage":' + usage + "}"
    )
    return Reply(headers=[("content-type", "application/json")], body=body.encode())


def claude_stream(usage: str) -> Reply:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-6",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 1},
        },
    }
    events = [
        b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n",
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":'
        + usage.encode()
        + b"}\n\n",
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    return Reply(headers=[("content-type", "text/event-stream")], chunks=events)


def gemini_response(usage: str) -> Reply:
    body = '{"candidates":[{"content":{"parts":[{"text":"Hi"}],"role":"model"},"finishReason":"STOP"}],"usageMetadata":'
    return Reply(headers=[("content-type", "application/json")], body=(body + usage + "}").encode())


def stored_usage(gw: Gateway, user_id: str) -> dict[str, int]:
    usage: Any = gw.wait_recorded(user_id)[0]["usage"]
    return dict(orjson.loads(usage) if isinstance(usage, str) else usage)


def meters(gw: Gateway | GatewayProcess, key: str) -> dict[str, tuple[int, int]]:
    """Each meter's (consumed, reserved) from the status endpoint, which reads the store."""
    resp = httpx.get(f"{gw.url}/api/billing/status", headers={"authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    return {m["name"]: (m["consumed"], m["reserved"]) for m in resp.json()["meters"] if m["consumed"] or m["reserved"]}


CLAUDE_USAGES = {
    # orjson reads an integer past 64 bits as a float: int() of it does not fit the journal's JSON
    "float": ('{"input_tokens":1e26,"output_tokens":5}', {"claude_input_tokens": MAX_TOKENS_PER_REQUEST}),
    "u64": (
        '{"input_tokens":18446744073709551615,"output_tokens":5}',
        {"claude_input_tokens": MAX_TOKENS_PER_REQUEST},
    ),
    "i64": (
        '{"input_tokens":9223372036854775807,"output_tokens":9223372036854775807}',
        {"claude_input_tokens": MAX_TOKENS_PER_REQUEST, "claude_output_tokens": MAX_TOKENS_PER_REQUEST},
    ),
    # a COUNT meter is one Polar event per unit
    "searches": (
        '{"input_tokens":3,"output_tokens":5,"server_tool_use":{"web_search_requests":1000000000}}',
        {"claude_input_tokens": 3, "claude_web_searches": MAX_UNITS_PER_REQUEST},
    ),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("case", CLAUDE_USAGES)
def test_a_provider_s_absurd_claude_usage_is_billed_bounded(  # type: ignore[no-untyped-def]
    make_gateway, upstream: FakeUpstream, case: str, stream: bool
) -> None:
    usage, billed = CLAUDE_USAGES[case]
    expected = {"claude_output_tokens": 5, **billed}
    gw: Gateway = make_gateway()
    key = gw.issue_key("hostile")
    upstream.enqueue(claude_stream(usage) if stream else claude_message(usage))
    c = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
    if stream:
        with c.messages.stream(model="claude-sonnet-4-6", max_tokens=64, messages=MSG) as s:  # type: ignore[arg-type]
            s.until_done()
    else:
        c.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MSG)  # type: ignore[arg-type]
    assert stored_usage(gw, "hostile") == expected  # the request is kept, billed bounded
    assert meters(gw, key) == {name: (value, 0) for name, value in expected.items()}  # nothing left reserved
    assert httpx.get(f"{gw.url}/healthz").json()["unstored"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_provider_s_usage_too_deep_to_write_back_is_billed_without_it(  # type: ignore[no-untyped-def]
    make_gateway, upstream: FakeUpstream, stream: bool
) -> None:
    # orjson reads JSON nested 1,024 deep but writes only 254: the journal could not write the request's
    # raw usage, and the request was lost (never stored nor billed), its reservation held.
    usage = '{"input_tokens":3,"output_tokens":5,"x":' + "[" * 300 + "]" * 300 + "}"
    gw: Gateway = make_gateway()
    key = gw.issue_key("hostile")
    upstream.enqueue(claude_stream(usage) if stream else claude_message(usage))
    body = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": MSG, "stream": stream}
    resp = httpx.post(f"{gw.url}/anthropic/v1/messages", headers={"x-api-key": key}, json=body, timeout=10)
    assert resp.status_code == 200
    assert stored_usage(gw, "hostile") == {"claude_input_tokens": 3, "claude_output_tokens": 5}
    assert meters(gw, key) == {"claude_input_tokens": (3, 0), "claude_output_tokens": (5, 0)}
    assert httpx.get(f"{gw.url}/healthz").json()["unstored"] == 0


def test_a_provider_s_absurd_gemini_usage_is_billed_bounded(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway()
    key = gw.issue_key("hostile")
    upstream.enqueue(gemini_response('{"promptTokenCount":1e30,"candidatesTokenCount":18446744073709551615}'))
    # (raw HTTP: google-genai itself refuses such a count; the gateway relays the answer as it came)
    body = {"contents": [{"parts": [{"text": "Hi"}]}]}
    resp = httpx.post(f"{gw.url}{GEMINI}", headers={"x-goog-api-key": key}, json=body, timeout=10)
    assert resp.status_code == 200
    expected = {"gemini_input_tokens": MAX_TOKENS_PER_REQUEST, "gemini_output_tokens": MAX_TOKENS_PER_REQUEST}
    assert stored_usage(gw, "hostile") == expected
    assert meters(gw, key) == {name: (value, 0) for name, value in expected.items()}


def stored_reservation(gw: Gateway, user_id: str) -> dict[str, int]:
    reservation: Any = gw.wait_recorded(user_id)[0]["reservation"]
    return dict(orjson.loads(reservation) if isinstance(reservation, str) else reservation)


CLIENT_CAPS = {
    # each fallback may write its own max_tokens: 2 x (2**64 - 1) reserved
    "claude-fallbacks": (
        "/anthropic/v1/messages",
        {"model": "claude-sonnet-4-6", "max_tokens": U64, "messages": MSG, "fallbacks": [{"max_tokens": U64}]},
        "claude_output_tokens",
    ),
    # the cap is per candidate; Google reads int32 fields from decimal strings too
    "gemini-candidates": (
        GEMINI,
        {"contents": [{"parts": [{"text": "Hi"}]}], "generationConfig": {"candidateCount": U64}},
        "gemini_output_tokens",
    ),
    "gemini-string-cap": (
        GEMINI,
        {"contents": [{"parts": [{"text": "Hi"}]}], "generationConfig": {"maxOutputTokens": "9" * 30}},
        "gemini_output_tokens",
    ),
    "claude-web-search-uses": (
        "/anthropic/v1/messages",
        {
            "model": "claude-sonnet-4-6",
            "max_tokens": 64,
            "messages": MSG,
            "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": U64}] * 2,
        },
        "claude_web_searches",
    ),
}


@pytest.mark.parametrize("shared", [False, True], ids=["one-process", "leases"])
@pytest.mark.parametrize("case", CLIENT_CAPS)
def test_a_client_s_absurd_cap_is_reserved_bounded_on_an_unlimited_meter(  # type: ignore[no-untyped-def]
    make_gateway, case: str, shared: bool
) -> None:
    # Forwarded (the provider refuses such a request with its own 400; the fake answers), never a 500
    # with the reservation left held.
    path, body, meter = CLIENT_CAPS[case]
    gw: Gateway = make_gateway(shared=shared)
    key = gw.issue_key("greedy")
    resp = httpx.post(f"{gw.url}{path}", headers={"x-api-key": key, "x-goog-api-key": key}, json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    ceiling = MAX_UNITS_PER_REQUEST if meter == "claude_web_searches" else MAX_TOKENS_PER_REQUEST
    assert stored_reservation(gw, "greedy")[meter] == ceiling
    assert all(reserved == 0 for _, reserved in meters(gw, key).values())


@pytest.mark.parametrize("shared", [False, True], ids=["one-process", "leases"])
def test_a_client_s_absurd_cap_on_a_limited_meter_is_a_402(make_gateway, upstream: FakeUpstream, shared: bool) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(plan={"claude_output_tokens": 1000}, shared=shared)
    key = gw.issue_key("greedy")
    c = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
    with pytest.raises(anthropic.PaymentRequiredError) as err:
        c.messages.create(
            model="claude-sonnet-4-6",
            max_tokens=U64,
            messages=MSG,  # type: ignore[arg-type]
            extra_body={"fallbacks": [{"max_tokens": U64}]},
            timeout=10,  # (else the SDK refuses such a cap without streaming)
        )
    assert err.value.body["error"]["meter"] == "claude_output_tokens"  # type: ignore[index]
    assert upstream.requests == []
    c.messages.create(model="claude-sonnet-4-6", max_tokens=1000, messages=MSG)  # type: ignore[arg-type]
    assert gw.wait_recorded("greedy")[0]["status_code"] == 200


def test_a_boolean_sample_count_killed_in_flight_is_estimated_as_an_invalid_count(
    tmp_path: Path, upstream: FakeUpstream, databases: Databases
) -> None:
    # `sampleCount: true` was reserved as JSON `true`; settled by estimate (a crash, here), the usage
    # `{"gemini_images": true}` could not be stored on PostgreSQL (its usage sums cast to bigint): the
    # recovery failed and the gateway could not start again. Now it reserves (and estimates) what any
    # invalid count does, the default 4.
    upstream.reset()  # (no other test's request counted as this one in flight)
    db = databases.new("crash")
    env = process_env(db, upstream, GATEWAY_JOURNAL_DIR=str(tmp_path / "journal"))
    gw = GatewayProcess(env).start()
    try:
        key = gw.issue_key("crash")
        upstream.enqueue(Reply.fixture("gemini/imagen_predict.json", delay_before=30))
        body = {"instances": [{"prompt": "a cat"}], "parameters": {"sampleCount": True}}
        path = "/gemini/v1beta/models/imagen-4.0-generate-001:predict"
        with ThreadPoolExecutor(1) as pool:
            pool.submit(httpx.post, f"{gw.url}{path}", json=body, headers={"x-goog-api-key": key}, timeout=60)
            upstream.wait_for_requests(1, timeout=10)  # in flight
            gw.kill()
        gw = GatewayProcess(env, gw.port).start()  # recovery settles it by its reservation
        # (consumed: on PostgreSQL the dead process's lease counts as reserved until it is taken for dead)
        assert meters(gw, key)["gemini_images"][0] == 4
        assert db.usage("crash") == {"gemini_images": 4}
    finally:
        gw.stop()
        upstream.reset()
