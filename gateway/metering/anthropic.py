"""Usage extraction for Anthropic /v1/messages (non-streaming bodies and SSE streams).

Billing rules (Anthropic's usage object): `output_tokens` already includes thinking, so
`output_tokens_details.thinking_tokens` is never added; `input_tokens` excludes cache
reads/writes, which have their own meters; `cache_creation.ephemeral_1h_input_tokens` is the
part of the cache writes with a 1-hour TTL (priced higher), metered on its own besides the total;
`server_tool_use.web_search_requests` counts web searches, charged per search on top of tokens
(`web_fetch_requests` are not: a fetch costs only the tokens of what it fetched). Stream usage
fields are cumulative, so `message_delta` values overwrite and are never summed (nested objects
like `server_tool_use` are replaced whole). With server-side compaction, `usage.iterations` lists each
sampling step; a `compaction` step's tokens are billed but left out of the top-level fields, so they are
added to them (`message` steps are already in them).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from gateway.metering.sse import BLANK_LINE_ENDS, SSEParser, lone_event
from gateway.metering.usage import BINARY as _BINARY
from gateway.metering.usage import Usage, as_count
from gateway.meters import (
    CLAUDE_CACHE_READ,
    CLAUDE_CACHE_WRITE,
    CLAUDE_CACHE_WRITE_1H,
    CLAUDE_INPUT,
    CLAUDE_OUTPUT,
    CLAUDE_WEB_SEARCHES,
)

_START = b"message_start"
_DELTA = b"message_delta"
_STOP = b"message_stop"
_ERROR = b"error"
_PARSED = frozenset({_START, _DELTA, _ERROR})
# Every event the meter reads has one of these in its raw text: in its `event:` line, or in
# the payload `type` that `_sniff_event` reads. Events without them (content deltas, pings)
# are skipped without being split into lines.
_MESSAGE = b"message_"
_NEEDLES = (_MESSAGE, _ERROR)
# Used only when an event arrives without an `event:` line; the type is near the start.
_TYPE_RE = re.compile(rb'"type"\s*:\s*"([a-z_]+)"')


def meters_from_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    """Map an Anthropic `usage` object to the Claude meters (missing/null -> 0).

    `claude_cache_write_tokens` stays every cache write, whatever its TTL, and
    `claude_cache_write_1h_tokens` is the 1-hour part of it (0 without `cache_creation`).
    """
    u = usage or {}
    get = u.get
    # (the two nested objects inline: every response pays for this; an absent count is 0 as
    # `as_count(None)` would make it, without the call)
    ttl = get("cache_creation")
    tools = get("server_tool_use")
    i, o = get("input_tokens", 0), get("output_tokens", 0)
    w, r = get("cache_creation_input_tokens", 0), get("cache_read_input_tokens", 0)
    w1 = ttl.get("ephemeral_1h_input_tokens", 0) if isinstance(ttl, dict) else 0
    s = tools.get("web_search_requests", 0) if isinstance(tools, dict) else 0
    # Plain non-negative ints (what the API sends) are their own counts: one check instead of six calls
    # (ints OR to a negative one exactly when one of them is negative).
    if not (type(i) is type(o) is type(w) is type(r) is type(w1) is type(s) is int and i | o | w | r | w1 | s >= 0):
        i, o, w, r, w1, s = as_count(i), as_count(o), as_count(w), as_count(r), as_count(w1), as_count(s)
    iterations = get("iterations")
    if iterations:  # (absent on most responses: one lookup)
        i, o, w, r, w1 = _with_compactions(iterations, i, o, w, r, w1)
    return {
        CLAUDE_INPUT: i,
        CLAUDE_OUTPUT: o,
        CLAUDE_CACHE_WRITE: w,
        CLAUDE_CACHE_WRITE_1H: w1,
        CLAUDE_CACHE_READ: r,
        CLAUDE_WEB_SEARCHES: s,
    }


def _with_compactions(iterations: object, i: int, o: int, w: int, r: int, w1: int) -> tuple[int, int, int, int, int]:
    """The counts plus those of each `compaction` entry of `usage.iterations`: a compaction is a sampling step
    of its own, billed, whose tokens the top-level fields leave out (its `message` entries are in them)."""
    if not isinstance(iterations, list):
        return i, o, w, r, w1
    for it in iterations:
        if isinstance(it, dict) and it.get("type") == "compaction":
            ttl = it.get("cache_creation")
            i += as_count(it.get("input_tokens"))
            o += as_count(it.get("output_tokens"))
            w += as_count(it.get("cache_creation_input_tokens"))
            r += as_count(it.get("cache_read_input_tokens"))
            w1 += as_count(ttl.get("ephemeral_1h_input_tokens")) if isinstance(ttl, dict) else 0
    return i, o, w, r, w1


def usage_from_message(body: bytes | dict[str, Any]) -> Usage:
    """Usage of a complete (non-streaming) Messages response; error bodies give zeros."""
    obj: object = body
    if isinstance(body, _BINARY):
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return Usage(meters=meters_from_usage(None))
    if not isinstance(obj, dict):
        return Usage(meters=meters_from_usage(None))
    error = obj.get("error")  # {"type": "error", "error": {...}} on 4xx/5xx bodies
    raw = obj.get("usage")
    if not isinstance(raw, dict):
        return Usage(meters=meters_from_usage(None), final=True, error=error)
    return Usage(meters=meters_from_usage(raw), raw=raw, final=True, error=error, seen=True)


def _sniff_event(data: bytes) -> bytes:
    """Event name from the payload's `type` for streams whose `event:` lines were lost.

    Anthropic always sends `event:` lines; if something upstream stripped them the client
    sees nothing, but the provider still billed, so the meter keeps counting.
    """
    m = _TYPE_RE.search(data, 0, 96)
    return m.group(1) if m else b""


class AnthropicStreamMeter:
    """Accumulates usage from a Messages SSE stream as the relay forwards it.

    Only `message_start`, `message_delta` and `error` payloads are JSON-parsed. Content
    deltas and pings are never parsed (see `_NEEDLES`): a chunk of nothing but them is
    dropped here after a few C-level scans, and one sharing a chunk with an event that
    matters is dropped by the SSE parser. The few whose text happens to hold a needle are
    dropped by event name.
    """

    __slots__ = ("_error", "_final", "_usage", "sse")

    def __init__(self) -> None:
        self.sse = SSEParser(only=_NEEDLES)
        self._usage: dict[str, Any] | None = None
        self._final = False
        self._error: Any = None

    def feed(self, chunk: bytes) -> None:
        sse = self.sse
        events = None
        if sse.idle and chunk.endswith(BLANK_LINE_ENDS):
            if chunk.find(_MESSAGE) < 0 and chunk.find(_ERROR) < 0:
                return  # whole events, none of them one we read (most chunks): a few C-level scans
            event = lone_event(chunk)  # one event per chunk, as Anthropic writes them: no list, no checks twice
            if event is not None:
                events = (event,)
        for name, data in events or sse.feed(chunk):
            if not name:
                name = _sniff_event(data)
            if name == _STOP:
                self._final = True
            elif name in _PARSED:
                self._event(name, data)

    def _event(self, name: bytes, data: bytes) -> None:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        if name == _ERROR:
            err = obj.get("error")
            self._error = err if err is not None else obj
            return
        if name == _START:
            msg = obj.get("message")
            usage = msg.get("usage") if isinstance(msg, dict) else None
            if isinstance(usage, dict):
                # (the parse is this meter's own: kept as it is when no null has to go, a C-level check)
                self._usage = usage if None not in usage.values() else {k: v for k, v in usage.items() if v is not None}
            return
        usage = obj.get("usage")
        if isinstance(usage, dict):
            merged = self._usage if self._usage is not None else {}
            # Cumulative totals: overwrite, never add.
            if None not in usage.values():
                merged.update(usage)
            else:
                for k, v in usage.items():
                    if v is not None:
                        merged[k] = v
            self._usage = merged

    def usage(self) -> Usage:
        raw = dict(self._usage) if self._usage is not None else None
        return Usage(
            meters=meters_from_usage(raw),
            raw=raw,
            final=self._final,
            error=self._error,
            seen=raw is not None,
        )
