"""What an Anthropic request reserves for server tools (their results as input, web searches) and on the
meter of cache writes with a 1h TTL."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.metering.estimate import estimate_input_tokens
from gateway.metering.server_tools import offers_claude_server_tools, requested_web_searches
from gateway.meters import (
    CLAUDE_CACHE_READ,
    CLAUDE_CACHE_WRITE,
    CLAUDE_CACHE_WRITE_1H,
    CLAUDE_INPUT,
    CLAUDE_OUTPUT,
    CLAUDE_WEB_SEARCHES,
)
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import Route
from gateway.settings import ConfigError, ReservationConfig, parse_file_config

ROUTE = Route("messages", "/v1/messages", "", metered=True, has_body=True)
HI = [{"role": "user", "content": "hi"}]
SEARCH = {"type": "web_search_20250305", "name": "web_search"}
FETCH = {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 9}
CUSTOM = {"name": "web_search", "input_schema": {"type": "object"}}  # the client runs it: no charge


def reserve(tools: list[object] | None, unbounded: int = 7) -> dict[str, int]:
    obj: dict[str, object] = {"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": HI}
    if tools is not None:
        obj["tools"] = tools
    body = orjson.dumps(obj)
    provider = AnthropicProvider("http://x", "k", 4096, 1_000_000, unbounded)
    return provider.prepare(ROUTE, body, orjson.loads(body)).reservation


def test_1h_cache_writes_are_reserved_like_all_cache_writes() -> None:
    # A plan may limit the 1h meter; it can hold at most the whole input, like every input meter.
    for tools in (None, [SEARCH]):
        r = reserve(tools)
        assert r[CLAUDE_CACHE_WRITE_1H] == r[CLAUDE_CACHE_WRITE] == r[CLAUDE_INPUT] > 0


@pytest.mark.parametrize(
    ("tools", "searches"),
    [
        ([{**SEARCH, "max_uses": 5}], 5),  # the API stops searching at max_uses
        ([SEARCH], 7),  # no max_uses: no limit upstream, so [reservation] web_searches_per_request
        ([{**SEARCH, "type": "web_search_20260209", "max_uses": 2}, FETCH, CUSTOM], 2),
        ([{**SEARCH, "max_uses": 2}, {**SEARCH, "max_uses": 3}], 5),
        ([{**SEARCH, "max_uses": "5"}], 7),  # not a cap the API takes (it refuses the request)
        ([{**SEARCH, "max_uses": True}], 7),
    ],
)
def test_web_searches_reserve_max_uses_or_the_configured_bound(tools: list[object], searches: int) -> None:
    assert reserve(tools)[CLAUDE_WEB_SEARCHES] == searches


@pytest.mark.parametrize("tools", [None, [], [FETCH, CUSTOM], [{**SEARCH, "max_uses": 0}], "junk", [None, 3]])
def test_requests_that_cannot_search_reserve_no_searches(tools: list[object] | None) -> None:
    # Absent rather than 0: a user out of searches may still send requests that cannot search.
    assert CLAUDE_WEB_SEARCHES not in reserve(tools)


def test_requested_web_searches() -> None:
    assert requested_web_searches({"tools": [SEARCH, {**SEARCH, "max_uses": 4}]}, 10) == 14
    assert requested_web_searches({"tools": [SEARCH]}, 0) == 0  # a bound of 0 reserves nothing
    assert requested_web_searches({"tools": {"type": "web_search_20250305"}}, 10) == 0
    assert requested_web_searches({}, 10) == 0


def test_config_takes_the_new_meters_and_the_search_bound() -> None:
    cfg = parse_file_config(
        {
            "plan": {"claude_web_searches": 100, "claude_cache_write_1h_tokens": 5000},
            "reservation": {"web_searches_per_request": 3},
        }
    )
    assert cfg.plan == {CLAUDE_WEB_SEARCHES: 100, CLAUDE_CACHE_WRITE_1H: 5000}
    assert cfg.reservation.web_searches_per_request == 3
    assert ReservationConfig().web_searches_per_request == 10
    with pytest.raises(ConfigError, match="web_searches_per_request must be a non-negative integer"):
        parse_file_config({"reservation": {"web_searches_per_request": -1}})


DOCS = 250_000  # `[reservation] document_input_tokens` in these tests (the default is 1,000,000)
TOOLS = 400_000  # `[reservation] server_tool_input_tokens` in these tests (the default is 1,000,000)
TOOLS_PROMPT = 1024  # the tool-use system prompt, whenever `tools` is set
BUILT_IN = 1024  # each typed tool's definition, not in the body
PDF = {"type": "document", "source": {"type": "url", "url": "https://example.com/report.pdf"}}
MCP = [{"type": "url", "url": "https://mcp.example.com/sse", "name": "example"}]
SERVER_TOOLS = [
    SEARCH,  # the search results: input of the later sampling steps
    FETCH,  # the pages fetched
    {"type": "code_execution_20250825", "name": "code_execution"},  # the code's output
    {"type": "tool_search_tool_regex_20251119", "name": "tool_search_tool_regex"},  # the tools found
    {"type": "mcp_toolset", "mcp_server_name": "example"},
    {"type": "some_future_tool_20270101", "name": "later"},  # unknown: the safe side
]
CLIENT_TOOLS = [
    CUSTOM,  # the client runs these: their results come back in the next request's body, counted then
    {**CUSTOM, "type": "custom"},
    {"type": "bash_20250124", "name": "bash"},
    {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
    {"type": "computer_20250124", "name": "computer", "display_width_px": 1024, "display_height_px": 768},
    {"type": "memory_20250818", "name": "memory"},
]


def prepare(extra: dict[str, Any], docs: int = DOCS, tools: int = TOOLS) -> tuple[dict[str, int], int, int]:
    """The reservation, the rate limit's tokens and the input estimate of the body alone."""
    obj: dict[str, Any] = {"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": HI, **extra}
    body = orjson.dumps(obj)
    provider = AnthropicProvider("http://x", "k", 4096, docs, 10, tools)
    call = provider.prepare(ROUTE, body, orjson.loads(body))
    return call.reservation, call.rate_tokens, estimate_input_tokens(body)


def overhead(tools: list[dict[str, Any]]) -> int:
    return TOOLS_PROMPT + BUILT_IN * sum(1 for t in tools if t.get("type") not in (None, "custom"))


@pytest.mark.parametrize("tool", SERVER_TOOLS, ids=lambda t: str(t["type"]))
def test_a_server_tool_reserves_the_server_tool_ceiling(tool: dict[str, Any]) -> None:
    # usage.input_tokens is cumulative over the sampling steps: what the tool fed back is input, bounded only
    # by the context window. Once per request, however many server tools it offers.
    r, rate, body = prepare({"tools": [tool]})
    assert r[CLAUDE_INPUT] == body + TOOLS_PROMPT + BUILT_IN + TOOLS
    assert r[CLAUDE_CACHE_WRITE] == r[CLAUDE_CACHE_WRITE_1H] == r[CLAUDE_CACHE_READ] == r[CLAUDE_INPUT]
    assert rate == body + TOOLS_PROMPT + BUILT_IN + 16  # the rate limit counts it by use, not the ceiling
    tools = [*CLIENT_TOOLS, tool, *SERVER_TOOLS]
    r, rate, body = prepare({"tools": tools})
    assert r[CLAUDE_INPUT] == body + overhead(tools) + TOOLS
    assert rate == body + overhead(tools) + 16


@pytest.mark.parametrize(
    ("tools", "extra"),
    [
        ([], 0),
        *(([t], overhead([t])) for t in CLIENT_TOOLS),
        (CLIENT_TOOLS, overhead(CLIENT_TOOLS)),
        ("junk", TOOLS_PROMPT),  # a `tools` the API refuses: the prompt only, no tool
        ([None, 3], TOOLS_PROMPT),
    ],
)
def test_client_tools_reserve_no_ceiling(tools: Any, extra: int) -> None:
    r, _, body = prepare({"tools": tools})
    assert r[CLAUDE_INPUT] == body + extra


def test_mcp_servers_reserve_the_ceiling_without_tools() -> None:
    # The MCP connector: the servers' tools and their results are input, none of it in the body.
    r, rate, body = prepare({"mcp_servers": MCP})
    assert r[CLAUDE_INPUT] == body + TOOLS
    assert rate == body + 16
    r, _, body = prepare({"mcp_servers": []})
    assert r[CLAUDE_INPUT] == body  # none: nothing to run
    r, _, body = prepare({"mcp_servers": MCP, "tools": [CUSTOM]})
    assert r[CLAUDE_INPUT] == body + TOOLS_PROMPT + TOOLS


def test_documents_and_server_tools_share_one_ceiling_the_larger() -> None:
    # A document and a tool's results fill the same context window: the larger applicable ceiling, once.
    both = {"messages": [{"role": "user", "content": [PDF, {"type": "text", "text": "Check it online."}]}]}
    r, rate, body = prepare({**both, "tools": [SEARCH]})
    assert r[CLAUDE_INPUT] == body + TOOLS_PROMPT + BUILT_IN + TOOLS  # 400,000 > 250,000
    assert rate == body + TOOLS_PROMPT + BUILT_IN + 16
    r, _, body = prepare({**both, "tools": [SEARCH]}, docs=600_000)
    assert r[CLAUDE_INPUT] == body + TOOLS_PROMPT + BUILT_IN + 600_000
    r, _, body = prepare({**both, "mcp_servers": MCP}, docs=600_000)
    assert r[CLAUDE_INPUT] == body + 600_000
    r, _, body = prepare({**both, "tools": [CUSTOM]}, docs=100_000)  # a client tool: the document's alone
    assert r[CLAUDE_INPUT] == body + TOOLS_PROMPT + 100_000


def test_a_plain_request_reserves_only_its_body() -> None:
    r, rate, body = prepare({})
    assert r == {
        CLAUDE_INPUT: body,
        CLAUDE_CACHE_WRITE: body,
        CLAUDE_CACHE_WRITE_1H: body,
        CLAUDE_CACHE_READ: body,
        CLAUDE_OUTPUT: 16,
    }
    assert rate == body + 16


def test_offers_claude_server_tools() -> None:
    assert offers_claude_server_tools([SEARCH], None)
    assert offers_claude_server_tools([{"type": 5}], None)  # not a client tool's type: the safe side
    assert offers_claude_server_tools(None, MCP)
    assert not offers_claude_server_tools(CLIENT_TOOLS, None)
    assert not offers_claude_server_tools(None, [])
    assert not offers_claude_server_tools({"type": "web_search_20250305"}, None)  # not a list: refused upstream


def test_the_server_tool_ceiling_setting() -> None:
    assert parse_file_config({}).reservation.server_tool_input_tokens == 1_000_000
    assert ReservationConfig().server_tool_input_tokens == 1_000_000
    raw = {"reservation": {"server_tool_input_tokens": 200_000}}
    assert parse_file_config(raw).reservation.server_tool_input_tokens == 200_000
    with pytest.raises(ConfigError, match="server_tool_input_tokens must be at least 1"):
        parse_file_config({"reservation": {"server_tool_input_tokens": 0}})
    with pytest.raises(ConfigError, match="server_tool_input_tokens must be a non-negative integer"):
        parse_file_config({"reservation": {"server_tool_input_tokens": -5}})
    # The provider's default is the setting's.
    body = orjson.dumps({"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": HI, "tools": [SEARCH]})
    call = AnthropicProvider("http://x", "k", 4096, 1_000_000).prepare(ROUTE, body, orjson.loads(body))
    assert call.reservation[CLAUDE_INPUT] == estimate_input_tokens(body) + 2048 + 1_000_000
