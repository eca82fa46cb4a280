"""Request-side bounds for Anthropic's server tools that are charged per use.

Only web search is: $10 per 1,000 searches on top of tokens, counted in the response's
`usage.server_tool_use.web_search_requests`. Web fetch (`web_fetch_*`) is charged only for the
tokens of what it fetched, which the token meters already hold, so it is not bounded here.
"""

from __future__ import annotations

from typing import Any

_WEB_SEARCH = "web_search_"  # the tool's `type`: web_search_20250305, web_search_20260209, ...


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
