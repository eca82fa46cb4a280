"""Anthropic Messages API specifics: routes, auth forms, error shape, usage meters."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.metering import (
    AnthropicStreamMeter,
    claude_media,
    requested_max_output,
    usage_from_message,
)
from gateway.metering.estimate import CLAUDE_IMAGE_MAX_TOKENS, continues_thread, fallback_attempts
from gateway.metering.server_tools import input_ceiling, offers_claude_server_tools, requested_web_searches
from gateway.meters import (
    CLAUDE_CACHE_READ,
    CLAUDE_CACHE_WRITE,
    CLAUDE_CACHE_WRITE_1H,
    CLAUDE_INPUT,
    CLAUDE_METERS,
    CLAUDE_OUTPUT,
    CLAUDE_WEB_SEARCHES,
)
from gateway.providers.base import Call, Headers, Route, check_model, forward_headers

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    504: "timeout_error",
}


# Tools add input the body does not hold: the tool-use system prompt (~350 tokens), and for each
# built-in tool (one with a `type`, e.g. text editor 700, computer 735 plus a 500 system prompt) its
# definition. A custom tool's definition is in the body, counted with it.
_TOOLS_OVERHEAD = 1024
_BUILT_IN_TOOL_OVERHEAD = 1024


def _tools_overhead(tools: object) -> int:
    if not isinstance(tools, list):
        return _TOOLS_OVERHEAD
    built_in = sum(1 for t in tools if isinstance(t, dict) and t.get("type") not in (None, "custom"))
    return _TOOLS_OVERHEAD + _BUILT_IN_TOOL_OVERHEAD * built_in


_NO_FIELDS: dict[str, Any] = {}  # a body that is not an object (refused upstream): no field set; never written


class AnthropicProvider:
    name = "anthropic"
    meters: tuple[str, ...] = CLAUDE_METERS

    def __init__(
        self,
        upstream: str,
        api_key: str,
        default_max_output: int,
        document_input_tokens: int,
        web_searches_per_request: int = 10,
        server_tool_input_tokens: int = 1_000_000,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self._credential = ("x-api-key", api_key)
        self._default_max_output = default_max_output
        self._document_input = document_input_tokens  # reserved once for a request's PDFs / referenced files
        self._web_searches_per_request = web_searches_per_request  # for a web search tool without max_uses
        self._server_tool_input = server_tool_input_tokens  # reserved once for what server tools feed back

    def match(self, method: str, path: str, query: bytes) -> Route | None:
        upstream_path = path + ("?" + query.decode("latin-1") if query else "")
        if method == "POST" and path == "/v1/messages":
            return Route("messages", upstream_path, "", metered=True, has_body=True)
        if method == "POST" and path == "/v1/messages/count_tokens":
            return Route("count_tokens", upstream_path, "", metered=False, has_body=True)
        if method == "GET" and (path == "/v1/models" or (path.startswith("/v1/models/") and path.count("/") == 3)):
            model = check_model(path[len("/v1/models/") :]) if len(path) > len("/v1/models") else ""
            return Route("models", upstream_path, model, metered=False, has_body=False)
        return None

    def extract_key(self, headers: Headers, query: bytes) -> str | None:
        for name, value in headers:  # names arrive lowercased (see providers.base)
            if name == b"x-api-key":  # SDK <= 1.x
                return value.decode("latin-1")
            if name == b"authorization" and value[:7].lower() == b"bearer ":  # SDK 2.x
                return value[7:].decode("latin-1").strip()
        return None

    def upstream_headers(self, headers: Headers) -> list[tuple[str, str]]:
        return forward_headers(headers, self._credential)

    def prepare(self, route: Route, body: bytes, obj: Any) -> Call:
        d: dict[str, Any] = obj if isinstance(obj, dict) else _NO_FIELDS
        stream = bool(d.get("stream"))
        model = str(d.get("model", ""))
        # Images and documents cost what their pixels and pages hold, not their size in the body (or nothing
        # of it, by `url` or `file_id`): see `claude_media`.
        media = claude_media(obj)
        est_in = media.input_tokens(body, CLAUDE_IMAGE_MAX_TOKENS)
        tools = d.get("tools")
        if tools:
            est_in += _tools_overhead(tools)
        # The rate limit is no bill: documents and server tools' results count there by what they used (at
        # settle), not by a ceiling that would refuse every such request while anything else is in the window.
        rate_tokens = est_in
        documents = media.documents
        # A continued thread: the provider holds the conversation, and the `system` and `tools` it was created
        # with (server tools among them), none of it in the body; bounded like a document and a server tool.
        held = "thread" in d and continues_thread(d["thread"])
        if held:
            documents += 1
        if documents or tools or "mcp_servers" in d:  # (a plain request skips the calls)
            offers = held or offers_claude_server_tools(tools, d.get("mcp_servers"))
            est_in += input_ceiling(documents, self._document_input, self._server_tool_input, offers)
        max_out = d.get("max_tokens")
        if type(max_out) is not int or max_out < 0:  # (an int, not a bool: the cap as sent, the usual case)
            max_out = requested_max_output(d, "anthropic")
        est_out = max_out if max_out is not None else self._default_max_output
        fallbacks = d.get("fallbacks")
        if fallbacks:  # every attempt reads the input again (and, declined, is billed): see `fallback_attempts`
            attempts, est_out = fallback_attempts(fallbacks, est_out)
            est_in, rate_tokens = est_in * attempts, rate_tokens * attempts
        # Input may land in any of the three input meters; each can hold at most the whole input.
        reservation = {
            CLAUDE_INPUT: est_in,
            CLAUDE_CACHE_WRITE: est_in,
            CLAUDE_CACHE_WRITE_1H: est_in,
            CLAUDE_CACHE_READ: est_in,
            CLAUDE_OUTPUT: est_out,
        }
        searches = requested_web_searches(d, self._web_searches_per_request) if tools else 0
        if searches:  # (absent, not 0: a user out of searches may still send requests that cannot search)
            reservation[CLAUDE_WEB_SEARCHES] = searches
        return Call(
            route=route,
            model=model,
            stream=stream,
            reservation=reservation,
            rate_tokens=rate_tokens + est_out,
            meter_factory=AnthropicStreamMeter if stream else None,
            body_usage=usage_from_message,
        )

    def error_body(self, status: int, kind: str, message: str, extra: dict[str, Any] | None = None) -> bytes:
        error: dict[str, Any] = {"type": _ERROR_TYPES.get(status, kind), "message": message}
        if extra:
            error.update(extra)
        return orjson.dumps({"type": "error", "error": error})

    def stream_error_event(self, route: Route, status: int, kind: str, message: str) -> bytes:
        data = orjson.dumps({"type": "error", "error": {"type": _ERROR_TYPES.get(status, kind), "message": message}})
        # (it follows whole events: the relay holds back a partial one, see gateway.holdback)
        return b"event: error\ndata: " + data + b"\n\n"
