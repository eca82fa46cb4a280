"""Oracles for the metering fast paths: the line-at-a-time SSE parser the gateway used
before events were parsed by block and filtered by needle, and meters built on it.

It runs every line through Python and filters nothing, so it is slow but obviously
right; the tests require the shipped parser and meters to agree with it on any chunking.
"""

from __future__ import annotations

from gateway.metering import AnthropicStreamMeter, GeminiSSEMeter

_BOM = b"\xef\xbb\xbf"

Event = tuple[bytes, bytes]


class ReferenceSSEParser:
    """The previous line-at-a-time parser, kept as it was to serve as the oracle.

    `event_name` is b"" when the event had no `event:` field (Gemini never sends one).
    Data lines are joined with b"\\n". LF, CRLF and CR all end a line, even when a CRLF
    is split across two chunks. An event only counts once its blank line arrives, as
    in the SSE spec and the SDKs' decoders, so a truncated trailing event is dropped.
    """

    __slots__ = ("_data", "_event", "_partial", "_skip_lf", "_started")
    idle = False  # the one addition: never idle, so a meter on it never skips a chunk

    def __init__(self) -> None:
        self._partial: list[bytes] = []  # pieces of the incomplete current line
        self._skip_lf = False  # previous chunk ended with CR: a leading LF belongs to it
        self._event = b""
        self._data: list[bytes] | None = None
        self._started = False  # first line seen (the BOM may only precede it)

    def feed(self, chunk: bytes) -> list[Event]:
        """Consume one chunk; return the events it completed (often none)."""
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
                if not chunk:
                    return []
        if b"\r" in chunk:
            self._skip_lf = chunk[-1] == 0x0D
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in chunk:
            self._partial.append(chunk)
            return []
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if self._partial:
            self._partial.append(lines[0])
            lines[0] = b"".join(self._partial)
            self._partial.clear()
        if tail:
            self._partial.append(tail)
        events: list[Event] = []
        for line in lines:
            self._line(line, events)
        return events

    def _line(self, line: bytes, events: list[Event]) -> None:
        if not self._started:
            self._started = True
            if line.startswith(_BOM):
                line = line[3:]
        if not line:
            data = self._data
            if data is not None:
                events.append((self._event, b"\n".join(data)))
            self._data = None
            self._event = b""
            return
        colon = line.find(b":")
        if colon == 0:
            return  # comment / keep-alive
        if colon < 0:
            name, value = line, b""
        else:
            name = line[:colon]
            value = line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            if self._data is None:
                self._data = [value]
            else:
                self._data.append(value)
        elif name == b"event":
            self._event = value
        # `id`, `retry` and unknown fields do not matter for metering.


def reference_anthropic() -> AnthropicStreamMeter:
    """The Anthropic meter on the oracle parser: every event is split into lines, none skipped."""
    meter = AnthropicStreamMeter()
    meter.sse = ReferenceSSEParser()  # type: ignore[assignment]
    return meter


def reference_gemini() -> GeminiSSEMeter:
    meter = GeminiSSEMeter()
    meter.sse = ReferenceSSEParser()  # type: ignore[assignment]
    return meter
