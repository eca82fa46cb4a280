"""Holding back a partial SSE event from the client until its blank line arrives.

A stream relayed as it arrives can break or stall anywhere, mostly inside an event. Had its first
part been relayed, the error event that follows would be read by the SDK as part of that event's
lines (a JSON decode error, an unknown event) instead of as the clean error it is. So the relay of
an SSE stream sends only whole events: the bytes after the last blank line wait, in `held`, for the
chunk that completes them, and are dropped if none comes. The meter still sees every byte as it
arrives; only what reaches the client waits.

Providers write one whole event per write: after such a chunk the meter's SSE parser is idle, and
with nothing held the relay sends the chunk as it is, for the cost of reading that attribute. What
is here runs only for the other chunks.
"""

from __future__ import annotations

# Whether a CR at the very end of the bytes seen so far is a whole line end or the first half of a
# CRLF is told by the next byte: such a blank line completes its event only once that byte arrives.
_AMBIGUOUS_BLANK_LINES = (b"\n\r", b"\r\r")
# A blank line end that a chunk completes starts at most 2 bytes before it (`\n\r|\n`, `\r\r|x`).
_CONTEXT = 2


def event_end(text: bytes) -> int:
    """Where the last complete event of `text` ends (just after its blank line); 0 when none does.

    Line ends are LF, CRLF and CR, as in the SSE spec. Two line ends in a row end an event, and
    every way of writing that ends with one of `\\n\\n`, `\\n\\r\\n`, `\\r\\r\\n` (any line end, then
    LF or CRLF), or `\\n\\r`, `\\r\\r` (then a lone CR) followed by a byte that is not LF: a CR as the
    last byte of `text` may be half of a CRLF split across chunks, and does not end an event yet.
    Each pattern ends a blank line whatever precedes it, so `text` may start anywhere in a line.
    """
    end = 0
    for pattern in (b"\n\n", b"\n\r\n", b"\r\r\n"):
        at = text.rfind(pattern)
        if at >= 0 and at + len(pattern) > end:
            end = at + len(pattern)
    last = len(text) - 1
    for pattern in _AMBIGUOUS_BLANK_LINES:
        # The last one followed by a byte: followed by LF it is `\n\r\n` / `\r\r\n`, found above,
        # ending later than any earlier lone-CR one.
        at = text.rfind(pattern, 0, last)
        if at >= 0 and text[at + 2] != 0x0A and at + 2 > end:
            end = at + 2
    return end


def release(held: list[bytes], chunk: bytes) -> bytes:
    """The bytes to send now of `held` (the parts of a partial event, from an event boundary) and
    `chunk` that follows them: every event they complete, joined once. What is left of an event
    not yet complete is kept in `held` (a huge one, e.g. a base64 image in many reads, is gathered
    as parts: each chunk is scanned once with the 2 bytes before it, never the whole event)."""
    context = held[-1][-_CONTEXT:] if held else b""
    if len(context) < _CONTEXT and len(held) > 1:
        context = b"".join(held[-_CONTEXT:])[-_CONTEXT:]  # (parts are never empty: 2 hold 2 bytes)
    end = event_end(context + chunk if context else chunk) - len(context)
    if end < 0:
        held.append(chunk)
        return b""
    if held:
        held.append(chunk[:end])
        out = b"".join(held)
        held.clear()
    else:
        out = chunk[:end]  # the whole chunk (no copy) when it ends an event
    if end < len(chunk):
        held.append(chunk[end:])
    return out


def settle(held: list[bytes]) -> bytes:
    """What of `held` goes to the client when the stream stops there (before the error event): the
    event a final CR completes, now that no LF can follow it, given that LF (google-genai on aiohttp
    splits lines at LF only: a lone CR would start the error event's line). The rest, a partial
    event, is dropped. Either way the client gets the events the meter counted, and `held` is emptied."""
    last = b"".join(held[-2:])[-2:]  # (parts are never empty)
    out = b"".join(held) + b"\n" if last in _AMBIGUOUS_BLANK_LINES else b""
    held.clear()
    return out
