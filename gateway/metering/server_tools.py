"""Request-side bounds for the tools the provider runs itself (server tools).

Their results are fed back to the model and billed as input tokens, which nothing in the request
bounds: a request offering one reserves an input ceiling once (`offers_claude_server_tools`,
`offers_gemini_server_tools`). Anthropic's web search is also charged per use: $10 per 1,000
searches on top of tokens, counted in the response's `usage.server_tool_use.web_search_requests`
(`requested_web_searches`). Web fetch (`web_fetch_*`) is charged only for the tokens of what it
fetched (input tokens, reserved by the ceiling), so it has no per-use bound.
"""

from __future__ import annotations

from typing import Any

_WEB_SEARCH = "web_search_"  # the tool's `type`: web_search_20250305, web_search_20260209, ...
# Claude tools the client runs: their results come back in the next request's body, counted by size then.
_CLAUDE_CLIENT_TOOLS = ("bash_", "text_editor_", "computer_", "memory_")
# Gemini tools the client runs (function calling, computer use), in both JSON casings; any other key of a
# `tools` entry (googleSearch, codeExecution, urlContext, fileSearch, googleMaps, ...) runs at Google.
_GEMINI_CLIENT_TOOLS = frozenset({"functionDeclarations", "function_declarations", "computerUse", "computer_use"})


def offers_claude_server_tools(tools: object, mcp_servers: object) -> bool:
    """Whether a Messages request offers a tool Anthropic runs: an entry of `tools` with a `type` other
    than the client's (none, "custom", bash, text editor, computer, memory), so an unknown future tool
    counts, or a non-empty `mcp_servers` (the MCP connector)."""
    if mcp_servers:
        return True
    if not isinstance(tools, list):
        return False
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        kind = tool.get("type")
        if kind is None or kind == "custom":
            continue
        if not (isinstance(kind, str) and kind.startswith(_CLAUDE_CLIENT_TOOLS)):
            return True
    return False


def offers_gemini_server_tools(tools: object) -> bool:
    """Whether a Gemini request's `tools` hold a tool Google runs: an entry with a key (set, not null)
    other than function declarations and computer use."""
    if not isinstance(tools, list):
        return False
    for tool in tools:
        if isinstance(tool, dict):
            for key, value in tool.items():
                if value is not None and key not in _GEMINI_CLIENT_TOOLS:
                    return True
    return False


def input_ceiling(documents: int, document_input: int, server_tool_input: int, offers_server_tools: bool) -> int:
    """Input a request reserves once beyond its body: what its documents hold (`document_input` when it has
    any) and what server tools feed back (`server_tool_input` when it offers one). Nothing in the body
    bounds either, and they share one context window: the larger ceiling, not the sum."""
    ceiling = document_input if documents else 0
    return server_tool_input if server_tool_input > ceiling and offers_server_tools else ceiling


def requested_web_searches(body_obj: dict[str, Any], unbounded: int) -> int:
    """The most web searches a Messages request can make: the `max_uses` of each web search tool
    in `tools` (the API stops searching there), or `unbounded` for one without a valid `max_uses`
    (the API sets no limit then). 0 when the request offers no web search tool."""
    tools = body_obj.get("tools")
    if not isinstance(tools, list):
        return 0
    n = 0
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        kind = tool.get("type")
        if not isinstance(kind, str) or not kind.startswith(_WEB_SEARCH):
            continue
        cap = tool.get("max_uses")
        n += cap if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0 else unbounded
    return n
