"""What an Anthropic request reserves beyond its body: tools, a float max_tokens."""

from __future__ import annotations

import orjson

from gateway.metering.estimate import estimate_input_tokens
from gateway.meters import CLAUDE_INPUT, CLAUDE_OUTPUT
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import Route

ROUTE = Route("messages", "/v1/messages", "", metered=True, has_body=True)
HI = [{"role": "user", "content": "hi"}]


def reserve(obj: dict[str, object]) -> tuple[dict[str, int], int]:
    """The reservation, and the input estimate of the body alone."""
    body = orjson.dumps(obj)
    call = AnthropicProvider("http://x", "k", 4096).prepare(ROUTE, body, orjson.loads(body))
    return call.reservation, estimate_input_tokens(body)


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
