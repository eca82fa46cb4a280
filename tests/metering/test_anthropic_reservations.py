"""What an Anthropic request reserves beyond its body (tools, a float max_tokens), and stream usage
read without `event:` lines or with a delta that leaves the input counts out."""

from __future__ import annotations

import orjson

from gateway.metering import AnthropicStreamMeter
from gateway.metering.estimate import estimate_input_tokens
from gateway.meters import CLAUDE_CACHE_READ, CLAUDE_CACHE_WRITE, CLAUDE_INPUT, CLAUDE_OUTPUT
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import Route

from ._split import run

ROUTE = Route("messages", "/v1/messages", "", metered=True, has_body=True)
HI = [{"role": "user", "content": "hi"}]


def reserve(obj: dict[str, object]) -> tuple[dict[str, int], int]:
    """The reservation, and the input estimate of the body alone."""
    body = orjson.dumps(obj)
    call = AnthropicProvider("http://x", "k", 4096).prepare(ROUTE, body, orjson.loads(body))
    return call.reservation, estimate_input_tokens(body)


def sse(*events: tuple[str, object], names: bool = True) -> bytes:
    if names:
        return b"".join(b"event: %s\ndata: %s\n\n" % (n.encode(), orjson.dumps(d)) for n, d in events)
    return b"".join(b"data: %s\n\n" % orjson.dumps(d) for _, d in events)


START = {
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


def test_an_integral_float_max_tokens_is_reserved_as_the_cap() -> None:
    # JSON `64000.0` (Python's json.dumps of a float) is the same cap; the 4096 default under-reserved.
    r, _ = reserve({"model": "claude-sonnet-4-6", "max_tokens": 64000.0, "messages": HI})
    assert r[CLAUDE_OUTPUT] == 64000
    r, _ = reserve({"model": "claude-sonnet-4-6", "max_tokens": 1e20, "messages": HI})
    assert r[CLAUDE_OUTPUT] == 4096  # past 2**53: not a cap the provider takes


def test_tools_reserve_the_tool_use_prompt_and_built_in_definitions() -> None:
    # The tool-use system prompt (~350 tokens) whenever `tools` is set; a built-in tool's definition
    # (the text editor's: 700) is not in the body; a custom tool's is, and counts with it.
    built_in = {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}
    custom = {"name": "get_weather", "input_schema": {"type": "object"}}
    r, body = reserve({"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": HI, "tools": [built_in, custom]})
    assert r[CLAUDE_INPUT] == body + 1024 + 1024
    r, body = reserve({"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": HI, "tools": [custom]})
    assert r[CLAUDE_INPUT] == body + 1024
    r, body = reserve({"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": HI})
    assert r[CLAUDE_INPUT] == body


def test_error_event_without_event_lines() -> None:
    body = sse(
        ("message_start", START), ("error", {"type": "error", "error": {"type": "overloaded_error"}}), names=False
    )
    u = run(AnthropicStreamMeter, [body])
    assert u.error == {"type": "overloaded_error"} and u.meters[CLAUDE_INPUT] == 10


def test_delta_with_only_output_keeps_inputs() -> None:
    d = {"type": "message_delta", "usage": {"output_tokens": 30}}
    u = run(
        AnthropicStreamMeter,
        [sse(("message_start", START), ("message_delta", d), ("message_stop", {"type": "message_stop"}))],
    )
    assert u.meters == {CLAUDE_INPUT: 10, CLAUDE_OUTPUT: 30, CLAUDE_CACHE_WRITE: 7, CLAUDE_CACHE_READ: 5}
    assert u.final
