"""Cache writes with a 1h TTL, web searches and server tools' input, through the official `anthropic` SDK:
what is recorded, what reaches Polar (external ids, values) and what a plan limit on them refuses."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import pytest

from gateway.settings import ReservationConfig
from tests.conftest import Gateway, fixture_bytes, wait_until
from tests.fakes.polar import FakePolar
from tests.fakes.upstream import FakeUpstream, Reply, split_sse_events

MSG = [{"role": "user", "content": "What is the weather in Paris?"}]
SEARCH = {"type": "web_search_20250305", "name": "web_search"}


def claude(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)


def searched_message(searches: int, write_5m: int = 600, write_1h: int = 1200) -> dict[str, Any]:
    """The recorded cache/thinking/web search message, with this many searches and this TTL split."""
    obj: dict[str, Any] = json.loads(fixture_bytes("anthropic/message_cache_thinking_servertool.json"))
    obj["usage"].update(
        cache_creation_input_tokens=write_5m + write_1h,
        cache_creation={"ephemeral_5m_input_tokens": write_5m, "ephemeral_1h_input_tokens": write_1h},
        server_tool_use={"web_search_requests": searches, "web_fetch_requests": 1},
    )
    return obj


def reply(obj: dict[str, Any]) -> Reply:
    return Reply.json(obj, headers=[("request-id", "req_011CserverToolsAaaaaaaaaa")])


@pytest.fixture
def polar() -> Iterator[FakePolar]:
    with FakePolar() as fake:
        yield fake


@pytest.fixture
def synced(make_gateway: Callable[..., Gateway], polar: FakePolar) -> Gateway:
    return make_gateway(polar_access_token=polar.token, polar_base_url=polar.url, sync_interval_seconds=0.2)


def test_message_meters_1h_writes_and_searches_and_polar_gets_them(
    synced: Gateway, upstream: FakeUpstream, polar: FakePolar
) -> None:
    gw = synced
    key = gw.issue_key("sam")
    upstream.enqueue(reply(searched_message(searches=2)))
    tools: Any = [{**SEARCH, "max_uses": 5}]
    msg = claude(gw, key).messages.create(model="claude-sonnet-4-6", max_tokens=512, messages=MSG, tools=tools)  # type: ignore[arg-type]
    assert msg.usage.server_tool_use is not None and msg.usage.server_tool_use.web_search_requests == 2
    assert msg.usage.cache_creation is not None and msg.usage.cache_creation.ephemeral_1h_input_tokens == 1200
    rid = gw.wait_recorded("sam")[0]["id"]
    assert gw.events("sam") == {
        "claude_input_tokens": 21,
        "claude_output_tokens": 312,
        "claude_cache_write_tokens": 1800,  # every write, as before: the 1h meter is a part of it
        "claude_cache_write_1h_tokens": 1200,
        "claude_cache_read_tokens": 3200,
        "claude_web_searches": 2,  # the web fetch costs only tokens: not metered
    }
    wait_until(lambda: len(polar.events) == 7)
    got = {x: (e["name"], e["metadata"]["value"]) for x, e in polar.events.items()}
    assert got == {
        f"{rid}:claude_input_tokens": ("claude_input_tokens", 21),
        f"{rid}:claude_output_tokens": ("claude_output_tokens", 312),
        f"{rid}:claude_cache_write_tokens": ("claude_cache_write_tokens", 1800),
        f"{rid}:claude_cache_write_1h_tokens": ("claude_cache_write_1h_tokens", 1200),
        f"{rid}:claude_cache_read_tokens": ("claude_cache_read_tokens", 3200),
        # a COUNT meter: one event of 1 per search
        f"{rid}:claude_web_searches:0": ("claude_web_searches", 1),
        f"{rid}:claude_web_searches:1": ("claude_web_searches", 1),
    }
    assert {e["external_customer_id"] for e in polar.events.values()} == {"sam"}
    wait_until(lambda: gw.query("SELECT COUNT(*) FROM requests WHERE sync_state = 'synced'") == [(1,)])


def test_stream_takes_searches_from_message_delta(synced: Gateway, upstream: FakeUpstream, polar: FakePolar) -> None:
    gw = synced
    key = gw.issue_key("sue")
    # The recorded stream whose deltas carry server_tool_use (cumulative: 1, then 1), with 1h writes
    # reported in its message_start.
    data = fixture_bytes("anthropic/stream_multiple_message_delta.sse").replace(
        b'"cache_creation_input_tokens":0,"cache_read_input_tokens":0,'
        b'"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0}',
        b'"cache_creation_input_tokens":700,"cache_read_input_tokens":0,'
        b'"cache_creation":{"ephemeral_5m_input_tokens":200,"ephemeral_1h_input_tokens":500}',
    )
    assert b'"ephemeral_1h_input_tokens":500' in data
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")], chunks=split_sse_events(data)))
    tools: Any = [SEARCH]
    with claude(gw, key).messages.stream(model="claude-sonnet-4-6", max_tokens=64, messages=MSG, tools=tools) as s:  # type: ignore[arg-type]
        final = s.get_final_message()
    assert final.usage.server_tool_use is not None and final.usage.server_tool_use.web_search_requests == 1
    rid = gw.wait_recorded("sue")[0]["id"]
    assert gw.events("sue") == {
        "claude_input_tokens": 25,
        "claude_output_tokens": 57,
        "claude_cache_write_tokens": 700,
        "claude_cache_write_1h_tokens": 500,
        "claude_web_searches": 1,
    }
    wait_until(lambda: len(polar.events) == 5)
    assert polar.events[f"{rid}:claude_web_searches:0"]["metadata"]["value"] == 1
    assert polar.events[f"{rid}:claude_cache_write_1h_tokens"]["metadata"]["value"] == 500
    assert polar.total("claude_web_searches", "sue") == 1


def test_402_when_web_searches_are_used_up(make_gateway: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    gw = make_gateway(plan={"claude_web_searches": 3})
    key = gw.issue_key("sol")
    c = claude(gw, key)
    upstream.enqueue(reply(searched_message(searches=2)))
    c.messages.create(model="claude-sonnet-4-6", max_tokens=512, messages=MSG, tools=[{**SEARCH, "max_uses": 2}])  # type: ignore[list-item]
    gw.wait_recorded("sol")
    before = len(upstream.requests)
    with pytest.raises(anthropic.PaymentRequiredError) as err:  # max_uses 2 > 1 left
        c.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MSG, tools=[{**SEARCH, "max_uses": 2}])  # type: ignore[list-item]
    assert err.value.status_code == 402
    assert err.value.body["error"]["meter"] == "claude_web_searches"  # type: ignore[index]
    assert "has 1 left but this request may use up to 2; lower the web_search tool's max_uses" in err.value.message
    assert len(upstream.requests) == before
    # A request that cannot search is not held back by the search quota; one that fits passes.
    c.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MSG)
    upstream.enqueue(reply(searched_message(searches=1)))
    c.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MSG, tools=[{**SEARCH, "max_uses": 1}])  # type: ignore[list-item]
    gw.wait_recorded("sol", 3)
    assert gw.events("sol")["claude_web_searches"] == 3
    with pytest.raises(anthropic.PaymentRequiredError):  # none left: without max_uses too
        c.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MSG, tools=[SEARCH])  # type: ignore[list-item]
    assert gw.meter(key, "claude_web_searches") == {
        "name": "claude_web_searches",
        "consumed": 3,
        "reserved": 0,
        "credited": 3,
        "remaining": 0,
        "percentUsed": 100.0,
        "status": "exceeded",
    }
    assert gw.meter(key, "claude_cache_write_1h_tokens")["consumed"] == 1200 + 1200
    assert len(upstream.requests) == before + 2


def test_a_search_tool_without_max_uses_reserves_the_configured_bound(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    gw = make_gateway(plan={"claude_web_searches": 2}, reservation=ReservationConfig(web_searches_per_request=3))
    key = gw.issue_key("syd")
    before = len(upstream.requests)
    with pytest.raises(anthropic.PaymentRequiredError) as err:  # no limit upstream: 3 reserved, 2 left
        claude(gw, key).messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MSG, tools=[SEARCH])  # type: ignore[list-item]
    assert "has 2 left but this request may use up to 3" in err.value.message
    assert len(upstream.requests) == before


def test_402_on_a_plan_limit_for_1h_cache_writes(make_gateway: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    gw = make_gateway(plan={"claude_cache_write_1h_tokens": 1500})
    key = gw.issue_key("sid")
    c = claude(gw, key)
    upstream.enqueue(reply(searched_message(searches=0, write_1h=1200)))
    c.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MSG)
    gw.wait_recorded("sid")
    before = len(upstream.requests)
    with pytest.raises(anthropic.PaymentRequiredError) as err:  # the whole input may be a 1h write
        c.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=[{"role": "user", "content": "x" * 700}])
    assert err.value.body["error"]["meter"] == "claude_cache_write_1h_tokens"  # type: ignore[index]
    assert len(upstream.requests) == before


def test_a_web_search_tool_needs_input_credit_for_the_server_tool_ceiling(  # type: ignore[no-untyped-def]
    make_gateway, upstream: FakeUpstream
) -> None:
    # The search results are input of the request's later sampling steps (usage.input_tokens is cumulative),
    # bounded by nothing in the body: the request reserves [reservation] server_tool_input_tokens (1,000,000
    # by default) once, beyond its body (bytes / 2 + 16), the tool-use prompt and the tool's definition.
    tools: Any = [{**SEARCH, "max_uses": 5}]
    free = make_gateway()  # the bytes the SDK sends, through a gateway without a plan
    upstream.enqueue(reply(searched_message(searches=2)))
    claude(free, free.issue_key("tad")).messages.create(
        model="claude-sonnet-4-6", max_tokens=512, messages=MSG, tools=tools
    )
    sent = upstream.requests[-1].body
    needed = len(sent) // 2 + 16 + 1024 + 1024 + 1_000_000
    gw: Gateway = make_gateway(plan={"claude_input_tokens": 1_000_000})
    key = gw.issue_key("tia")
    before = len(upstream.requests)
    with pytest.raises(anthropic.PaymentRequiredError) as err:
        claude(gw, key).messages.create(model="claude-sonnet-4-6", max_tokens=512, messages=MSG, tools=tools)
    error = err.value.body["error"]  # type: ignore[index]
    assert error["type"] == "billing_error" and error["meter"] == "claude_input_tokens"
    assert error["message"] == (
        f"quota for meter claude_input_tokens has 1000000 left but this request may use up to {needed}; send less"
        " input (images reserve 4,784 tokens each, documents [reservation] document_input_tokens, server tools"
        " such as web search [reservation] server_tool_input_tokens) or manage billing at /api/billing/portal"
    )
    assert len(upstream.requests) == before  # refused before the provider saw it
    meter = gw.meter(key, "claude_input_tokens")
    assert (meter["consumed"], meter["reserved"]) == (0, 0)

    # With the credit for the ceiling it is served, holds the ceiling in flight and settles to the usage.
    gw2: Gateway = make_gateway(plan={"claude_input_tokens": 1_100_000})
    key2 = gw2.issue_key("ted")
    upstream.enqueue(
        Reply.json(
            searched_message(searches=2), headers=[("request-id", "req_011CsearchInputAaaaaaaa")], delay_before=1.0
        )
    )
    done: list[Any] = []
    c2 = claude(gw2, key2)
    worker = threading.Thread(
        target=lambda: done.append(
            c2.messages.create(model="claude-sonnet-4-6", max_tokens=512, messages=MSG, tools=tools)
        )
    )
    worker.start()
    try:
        assert upstream.wait_for_requests(before + 1)[-1].body == sent
        held = wait_until(lambda: gw2.meter(key2, "claude_input_tokens")["reserved"])
        assert held == needed
    finally:
        worker.join(10)
    assert done and done[0].usage.input_tokens == 21
    gw2.wait_recorded("ted")
    assert gw2.events("ted") == {
        "claude_input_tokens": 21,
        "claude_output_tokens": 312,
        "claude_cache_write_tokens": 1800,
        "claude_cache_write_1h_tokens": 1200,
        "claude_cache_read_tokens": 3200,
        "claude_web_searches": 2,
    }
    after = gw2.meter(key2, "claude_input_tokens")
    assert (after["consumed"], after["reserved"], after["remaining"]) == (21, 0, 1_100_000 - 21)


def test_the_server_tool_ceiling_is_the_operators_setting(  # type: ignore[no-untyped-def]
    make_gateway, upstream: FakeUpstream
) -> None:
    # Fewer refusals for less exactness: lowered, a search fits a smaller credit than the default needs.
    exact: Gateway = make_gateway(plan={"claude_input_tokens": 60_000})
    strict = claude(exact, exact.issue_key("tom"))
    before = len(upstream.requests)
    with pytest.raises(anthropic.PaymentRequiredError):
        strict.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MSG, tools=[SEARCH])  # type: ignore[list-item]
    assert len(upstream.requests) == before
    gw: Gateway = make_gateway(
        plan={"claude_input_tokens": 60_000}, reservation=ReservationConfig(server_tool_input_tokens=50_000)
    )
    key = gw.issue_key("tim")
    upstream.enqueue(reply(searched_message(searches=1)))
    claude(gw, key).messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MSG, tools=[SEARCH])  # type: ignore[list-item]
    gw.wait_recorded("tim")
    meter = gw.meter(key, "claude_input_tokens")
    assert (meter["consumed"], meter["reserved"]) == (21, 0)
