"""Anthropic usage: non-streaming bodies and the SSE stream meter against recorded fixtures."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from gateway.metering import AnthropicStreamMeter, Usage, usage_from_message
from gateway.meters import (
    CLAUDE_CACHE_READ,
    CLAUDE_CACHE_WRITE,
    CLAUDE_CACHE_WRITE_1H,
    CLAUDE_INPUT,
    CLAUDE_OUTPUT,
    CLAUDE_WEB_SEARCHES,
)

from ._split import assert_split_invariant, run

FIXTURES = Path(__file__).parent.parent / "fixtures"
OVERLOADED = {"type": "overloaded_error", "message": "Overloaded"}


def meters(inp: int, out: int, write: int, read: int, write_1h: int = 0, searches: int = 0) -> dict[str, int]:
    return {
        CLAUDE_INPUT: inp,
        CLAUDE_OUTPUT: out,
        CLAUDE_CACHE_WRITE: write,
        CLAUDE_CACHE_WRITE_1H: write_1h,
        CLAUDE_CACHE_READ: read,
        CLAUDE_WEB_SEARCHES: searches,
    }


def stream(name: str) -> Usage:
    return run(AnthropicStreamMeter, [(FIXTURES / name).read_bytes()])


# --- non-streaming ---------------------------------------------------------------------------


def test_message_json() -> None:
    body = (FIXTURES / "anthropic/message.json").read_bytes()
    u = usage_from_message(body)
    assert u.meters == meters(12, 9, 0, 0)
    assert u.final and u.seen and u.error is None
    assert u.raw == orjson.loads(body)["usage"]
    assert usage_from_message(orjson.loads(body)) == u


def test_message_cache_thinking_servertool() -> None:
    u = usage_from_message((FIXTURES / "anthropic/message_cache_thinking_servertool.json").read_bytes())
    # 312 already includes the 240 thinking tokens: never 552. All 1800 writes are 5-minute ones;
    # one web search (web fetches are not counted: they cost only tokens).
    assert u.meters == meters(21, 312, 1800, 3200, write_1h=0, searches=1)
    assert u.raw["output_tokens_details"] == {"thinking_tokens": 240}
    assert u.final and u.seen


def recorded_usage_with(**changes: object) -> bytes:
    """The recorded cache/thinking/web search message with some of its usage fields changed."""
    obj = orjson.loads((FIXTURES / "anthropic/message_cache_thinking_servertool.json").read_bytes())
    obj["usage"].update(changes)
    return orjson.dumps(obj)


def test_message_1h_cache_writes_are_a_part_of_all_writes() -> None:
    body = recorded_usage_with(
        cache_creation={"ephemeral_5m_input_tokens": 600, "ephemeral_1h_input_tokens": 1200},
        server_tool_use={"web_search_requests": 3, "web_fetch_requests": 2},
    )
    # claude_cache_write_tokens stays every write (600 + 1200); the 1h meter holds the 1h part.
    assert usage_from_message(body).meters == meters(21, 312, 1800, 3200, write_1h=1200, searches=3)


@pytest.mark.parametrize("absent", [None, "null", "odd"])
def test_message_without_cache_creation_has_no_1h_writes(absent: str | None) -> None:
    obj = orjson.loads(recorded_usage_with())
    if absent is None:
        del obj["usage"]["cache_creation"], obj["usage"]["server_tool_use"]
    else:
        obj["usage"]["cache_creation"] = obj["usage"]["server_tool_use"] = None if absent == "null" else [1]
    assert usage_from_message(orjson.dumps(obj)).meters == meters(21, 312, 1800, 3200, write_1h=0, searches=0)


@pytest.mark.parametrize("name", sorted(p.name for p in (FIXTURES / "anthropic").glob("error_*.json")))
def test_error_bodies_give_zero_usage(name: str) -> None:
    body = (FIXTURES / "anthropic" / name).read_bytes()
    u = usage_from_message(body)
    assert u.meters == meters(0, 0, 0, 0)
    assert not u.seen and u.raw is None
    assert u.error == orjson.loads(body)["error"]


def test_message_missing_and_null_fields() -> None:
    u = usage_from_message({"usage": {"input_tokens": 3, "cache_read_input_tokens": None}})
    assert u.meters == meters(3, 0, 0, 0)
    assert u.seen


@pytest.mark.parametrize("body", [b"", b"not json", b"[1,2]", b'"x"', b"{}"])
def test_message_garbage(body: bytes) -> None:
    u = usage_from_message(body)
    assert u.meters == meters(0, 0, 0, 0)
    assert not u.seen and u.error is None


# --- streaming -------------------------------------------------------------------------------


def test_stream_text() -> None:
    u = stream("anthropic/stream_text.sse")
    assert u.meters == meters(25, 15, 0, 0)
    assert u.final and u.seen and u.error is None
    assert u.raw["output_tokens"] == 15 and u.raw["service_tier"] == "standard"


def test_stream_keeps_the_pricing_modifiers_of_message_start() -> None:
    u = stream("anthropic/stream_fast_priority.sse")
    assert u.meters == meters(27, 17, 0, 0)
    assert (u.raw["service_tier"], u.raw["speed"], u.raw["inference_geo"]) == ("priority", "fast", "global")
    assert u.final and u.error is None


def test_message_keeps_the_pricing_modifiers() -> None:
    u = usage_from_message((FIXTURES / "anthropic/message_fast_priority.json").read_bytes())
    assert u.meters == meters(14, 11, 0, 0)
    assert (u.raw["service_tier"], u.raw["speed"], u.raw["inference_geo"]) == ("priority", "fast", "global")


def test_modifiers_only_in_a_delta_are_kept_and_a_null_one_keeps_the_start_value() -> None:
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": 1, "speed": "fast"}}}
    d1 = {"type": "message_delta", "usage": {"output_tokens": 5, "speed": None, "service_tier": "priority"}}
    d2 = {"type": "message_delta", "usage": {"output_tokens": 6, "inference_geo": "us"}}
    u = run(AnthropicStreamMeter, [sse(("message_start", start), ("message_delta", d1), ("message_delta", d2))])
    assert u.meters == meters(3, 6, 0, 0)
    assert (u.raw["speed"], u.raw["service_tier"], u.raw["inference_geo"]) == ("fast", "priority", "us")


def test_stream_thinking_tool_use() -> None:
    u = stream("anthropic/stream_thinking_tool_use.sse")
    assert u.meters == meters(472, 89, 0, 2048)
    assert u.raw["output_tokens_details"] == {"thinking_tokens": 41}
    assert u.final and u.error is None


def test_stream_multiple_message_delta_is_last_wins_not_sum() -> None:
    u = stream("anthropic/stream_multiple_message_delta.sse")
    # server_tool_use arrives only in the deltas, cumulative: 1 search, not 2.
    assert u.meters == meters(25, 57, 0, 0, searches=1)
    assert u.raw["server_tool_use"] == {"web_search_requests": 1, "web_fetch_requests": 0}
    assert u.final


def test_stream_error_midstream_keeps_partial_usage() -> None:
    u = stream("anthropic/stream_error_midstream.sse")
    assert u.meters == meters(25, 1, 0, 0)  # message_start's placeholder output is all we saw
    assert u.error == OVERLOADED
    assert u.seen and not u.final


def test_stream_crlf_matches_lf() -> None:
    assert stream("edge/anthropic_stream_crlf.sse") == stream("anthropic/stream_text.sse")


def test_stream_without_event_lines_is_still_metered() -> None:
    # The SDK sees no events here, but the provider billed them; the meter sniffs `type`.
    assert stream("edge/anthropic_stream_no_event_lines.sse") == stream("anthropic/stream_text.sse")


STREAMS = [
    "anthropic/stream_text.sse",
    "anthropic/stream_fast_priority.sse",
    "anthropic/stream_thinking_tool_use.sse",
    "anthropic/stream_multiple_message_delta.sse",
    "anthropic/stream_error_midstream.sse",
    "edge/anthropic_stream_crlf.sse",
    "edge/anthropic_stream_no_event_lines.sse",
]


@pytest.mark.parametrize("name", STREAMS)
def test_stream_split_invariance(name: str) -> None:
    body = (FIXTURES / name).read_bytes()
    assert assert_split_invariant(AnthropicStreamMeter, body) == stream(name)


def test_usage_mid_stream_and_after_disconnect() -> None:
    body = (FIXTURES / "anthropic/stream_multiple_message_delta.sse").read_bytes()
    m = AnthropicStreamMeter()
    assert m.usage() == Usage(meters=meters(0, 0, 0, 0))
    cut = body.index(b"event: content_block_start")
    m.feed(body[:cut])
    u = m.usage()
    assert u.meters == meters(25, 1, 0, 0) and u.seen and not u.final
    second = body.index(b"event: message_delta", body.index(b"event: message_delta") + 1)
    m.feed(body[cut : second + 30])  # disconnect in the middle of the second delta
    u = m.usage()
    assert u.meters == meters(25, 40, 0, 0, searches=1) and not u.final


def test_usage_returns_a_copy() -> None:
    m = AnthropicStreamMeter()
    m.feed((FIXTURES / "anthropic/stream_text.sse").read_bytes())
    m.usage().raw["output_tokens"] = 999
    assert m.usage().meters[CLAUDE_OUTPUT] == 15


def sse(*events: tuple[str, object]) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (n.encode(), orjson.dumps(d)) for n, d in events)


def test_delta_overwrites_ignores_null_and_keeps_absent() -> None:
    start = {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": 10,
                "cache_read_input_tokens": 5,
                "cache_creation_input_tokens": 7,
                "output_tokens": 1,
            }
        },
    }
    d1 = {"type": "message_delta", "usage": {"output_tokens": 30, "cache_read_input_tokens": None}}
    d2 = {"type": "message_delta", "usage": {"output_tokens": 31, "input_tokens": 12}}
    u = run(AnthropicStreamMeter, [sse(("message_start", start), ("message_delta", d1), ("message_delta", d2))])
    assert u.meters == meters(12, 31, 7, 5)
    assert not u.final


def test_stream_cache_ttl_split_and_web_searches_overwrite() -> None:
    cache = {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 400}
    start = {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": 10,
                "cache_creation_input_tokens": 500,
                "cache_read_input_tokens": 0,
                "cache_creation": cache,
                "output_tokens": 1,
            }
        },
    }
    searched = [{"web_search_requests": n, "web_fetch_requests": 1} for n in (1, 3)]
    d1 = {"type": "message_delta", "usage": {"output_tokens": 30, "server_tool_use": searched[0]}}
    d2 = {"type": "message_delta", "usage": {"output_tokens": 60, "server_tool_use": searched[1]}}
    body = sse(("message_start", start), ("message_delta", d1), ("message_delta", d2), ("message_stop", {}))
    u = run(AnthropicStreamMeter, [body])
    # The 1h part comes from message_start and survives deltas without it; searches are 3, not 4.
    assert u.meters == meters(10, 60, 500, 0, write_1h=400, searches=3)
    assert u.final
    assert assert_split_invariant(AnthropicStreamMeter, body) == u


def test_delta_before_start_and_junk_events_do_not_crash() -> None:
    body = (
        b'event: message_delta\ndata: {"usage":{"output_tokens":4}}\n\n'
        b"event: content_block_delta\ndata: {not json\n\n"
        b"event: message_delta\ndata: {broken\n\n"
        b"event: message_delta\ndata: [1]\n\n"
        b'event: message_start\ndata: {"message": null}\n\n'
        b'event: error\ndata: {"type":"error"}\n\n'
        b"event: message_stop\ndata: {}\n\n"
    )
    u = run(AnthropicStreamMeter, [body])
    assert u.meters == meters(0, 4, 0, 0)
    assert u.final and u.seen
    assert u.error == {"type": "error"}  # no nested "error": keep the whole payload


# --- compaction (server-side context compaction, beta) ---------------------------------------------
# A compaction is a sampling step of its own: its entry in `usage.iterations` is "not included in the
# top-level `usage` fields" (the SDK's BetaUsage docstring), while `message` entries are. Figures as in
# Anthropic's compaction example: a 180,000-token context summarised, then answered from 23,000.
COMPACTION = {
    "type": "compaction",
    "input_tokens": 180000,
    "output_tokens": 3500,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 2000,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
}
ANSWER = {
    "type": "message",
    "input_tokens": 23000,
    "output_tokens": 1000,
    "cache_creation_input_tokens": 600,
    "cache_read_input_tokens": 0,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 600},
}
TOP_LEVEL = {
    "input_tokens": 23000,
    "output_tokens": 1000,
    "cache_creation_input_tokens": 600,
    "cache_read_input_tokens": 0,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 600},
}


def test_message_bills_compaction_iterations_on_top_of_the_top_level_usage() -> None:
    body = orjson.dumps({"type": "message", "usage": {**TOP_LEVEL, "iterations": [COMPACTION, ANSWER]}})
    # input 23,000 + 180,000; output 1,000 + 3,500; the compaction's cache read; the answer's 1h write once.
    assert usage_from_message(body).meters == meters(203000, 4500, 600, 2000, write_1h=600)


def test_compaction_iteration_with_odd_fields_counts_what_it_can() -> None:
    odd = [{"type": "compaction", "input_tokens": 10, "output_tokens": None, "cache_creation": [1]}, "x", None]
    body = orjson.dumps({"type": "message", "usage": {**TOP_LEVEL, "iterations": odd}})
    assert usage_from_message(body).meters == meters(23010, 1000, 600, 0, write_1h=600)
    body = orjson.dumps({"type": "message", "usage": {**TOP_LEVEL, "iterations": {"type": "compaction"}}})
    assert usage_from_message(body).meters == meters(23000, 1000, 600, 0, write_1h=600)


def test_stream_bills_compaction_iterations_from_the_last_message_delta() -> None:
    start_usage = {**TOP_LEVEL, "input_tokens": 23000, "output_tokens": 1}
    start = {"type": "message_start", "message": {"usage": start_usage}}
    # `iterations` is cumulative like every delta count: the second list replaces the first.
    d1 = {"type": "message_delta", "usage": {"output_tokens": 400, "iterations": [COMPACTION]}}
    d2 = {"type": "message_delta", "usage": {"output_tokens": 1000, "iterations": [COMPACTION, ANSWER]}}
    body = sse(("message_start", start), ("message_delta", d1), ("message_delta", d2), ("message_stop", {}))
    u = run(AnthropicStreamMeter, [body])
    assert u.meters == meters(203000, 4500, 600, 2000, write_1h=600)
    assert assert_split_invariant(AnthropicStreamMeter, body) == u
