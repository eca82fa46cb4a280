"""Incremental Server-Sent Events parser that only observes the relayed bytes.

The relay forwards upstream bytes untouched (SDKs break if `event:` lines or the space
after `data:` change), so this parser never re-frames anything. It keeps the raw bytes
of the event in flight and parses events only once their blank line has arrived, a whole
block at a time with C-level bytes methods: a huge `data:` line (a base64 image) costs
O(1) Python work per chunk until it completes, and a chunk of whole events from an idle
parser (what providers write) needs no joining at all. A consumer that only cares about
a few events can say which bytes they must contain, and the rest are never parsed.
"""

from __future__ import annotations

_BOM = b"\xef\xbb\xbf"
# A chunk with one of these endings ends with a blank line whose LF is its last byte: it
# closes every line and event it holds and leaves no CR pending (after LF-normalising,
# "\r\n\r\n", "\n\r\n" and "\r\r\n" all end in "\n\n"; "\r\n\r\n" ends with "\n\r\n").
BLANK_LINE_ENDS = (b"\n\n", b"\n\r\n", b"\r\r\n")

Event = tuple[bytes, bytes]


def _mentions(text: bytes, needles: tuple[bytes, ...]) -> bool:
    for needle in needles:
        if text.find(needle) >= 0:  # find, not `in`: bytes.__contains__ tries int first
            return True
    return False


class SSEParser:
    """Turns arbitrary byte chunks into complete `(event_name, data)` events.

    `event_name` is b"" when the event had no `event:` field (Gemini never sends one).
    Data lines are joined with b"\\n". LF, CRLF and CR all end a line, even when a CRLF
    is split across two chunks. An event only counts once its blank line arrives, as
    in the SSE spec and the SDKs' decoders, so a truncated trailing event is dropped.

    `only`: if given, an event is returned only if its raw text (its lines, line breaks
    aside) contains one of these byte strings (none may hold CR or LF); the others are
    skipped unparsed, and a chunk of whole events that holds none of them is dropped
    after a few C-level scans. The result does not depend on chunking, since an event's
    text is the same however it was cut.

    `idle` (read-only) is True when no line, event or CR is pending and the BOM is dealt
    with. A chunk that then ends with one of `BLANK_LINE_ENDS` holds only whole events and
    leaves the parser idle again, so a caller that can tell from its bytes alone that none
    of them matters may drop it without feeding it, saving even this method's call. Idle
    after a chunk, the bytes so far end with a whole event: the relay sends them as they
    are (see gateway.holdback); it must never be said inside an event (tests/test_holdback.py).
    """

    __slots__ = ("_only", "_pending", "_skip_lf", "_started", "idle")

    def __init__(self, only: tuple[bytes, ...] = ()) -> None:
        self._only = only  # needles hold no CR or LF, so LF-normalising cannot move them
        self._pending: list[bytes] = []  # LF-normalised bytes since the last blank line
        self._skip_lf = False  # previous chunk ended with CR: a leading LF belongs to it
        self._started = False  # first bytes parsed (the BOM may only precede them)
        self.idle = False

    def feed(self, chunk: bytes) -> list[Event]:
        """Consume one chunk; return the events it completed (often none)."""
        if self.idle and chunk.endswith(BLANK_LINE_ENDS):
            # Whole events only, and idle again after them: no state to join or keep.
            only = self._only
            if only:
                for needle in only:  # `_mentions` inlined: this is the hot path
                    if chunk.find(needle) >= 0:
                        break
                else:
                    return []
            # One event per chunk is what providers write: parse it without splitting blocks.
            cr = chunk.find(b"\r")
            if cr < 0:
                end = len(chunk) - 2
                if chunk.find(b"\n\n") != end:
                    return self._events(chunk)
            elif cr == len(chunk) - 4 and chunk.find(b"\n") == cr + 1:
                end = cr  # one line framed by CRLF CRLF, as Gemini sends
            else:
                # Several one-line events framed by CRLF CRLF (Gemini's, a few to a read under
                # load) are split as they are; anything else is rewritten to LF first.
                events = self._crlf_events(chunk)
                return events if events is not None else self._events(_to_lf(chunk))
            event = _event(chunk[:end])
            return [event] if event is not None else []
        if not self._started and chunk and chunk[:1] != b"\xef" and not self._pending:
            # The first bytes, and no BOM can lead them: nothing is pending, so they can take
            # the path above (a whole response often arrives in one read).
            self._started = self.idle = True
            return self.feed(chunk)
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if not chunk:
            return []
        if chunk.find(b"\r") >= 0:
            self._skip_lf = chunk[-1] == 0x0D
            chunk = _to_lf(chunk)
        pending = self._pending
        end = chunk.rfind(b"\n\n") + 2
        if end < 2:
            if chunk[0] == 0x0A and pending and pending[-1][-1] == 0x0A:
                end = 1  # the blank line straddles the chunk boundary
            else:
                pending.append(chunk)
                self.idle = False
                return []
        text = chunk[:end]  # the whole chunk (no copy) when it ends with a blank line
        if pending:
            pending.append(text)
            text = b"".join(pending)
            pending.clear()
        if end < len(chunk):
            pending.append(chunk[end:])
        if not self._started:
            self._started = True
            if text.startswith(_BOM):
                text = text[3:]
        self.idle = not pending and not self._skip_lf
        return self._events(text)

    def _events(self, text: bytes) -> list[Event]:
        """Events of LF-only `text` that ends with a blank line and starts idle."""
        only = self._only
        events: list[Event] = []
        # Blocks between blank lines are whole events; a block may start with the LF of
        # an extra blank line, and the last one is b"" or b"\n": neither holds a field.
        for block in text.split(b"\n\n"):
            if block and not (only and not _mentions(block, only)):
                event = _event(block)
                if event is not None:
                    events.append(event)
        return events

    def _crlf_events(self, chunk: bytes) -> list[Event] | None:
        """`_events` for a chunk of one-line events each ended by CRLF CRLF; None when it holds
        anything else (a multi-line event, another line ending), and nothing was consumed."""
        blocks = chunk.split(b"\r\n\r\n")
        if blocks.pop():
            return None  # it does not end with CRLF CRLF
        only = self._only
        events: list[Event] = []
        for block in blocks:
            if block.find(b"\n") >= 0 or block.find(b"\r") >= 0:
                return None
            if block and not (only and not _mentions(block, only)):
                event = _event(block)
                if event is not None:
                    events.append(event)
        return events


def lone_event(chunk: bytes) -> Event | None:
    """The event of a chunk that an idle parser would read as one LF-framed event and nothing else
    (how Anthropic writes each event); None for any other chunk, or an event without data."""
    end = len(chunk) - 2
    if chunk.find(b"\r") >= 0:
        return None
    if chunk.startswith(b"event: "):
        # `_event`'s second shape, read in place: no copy of the block, no call.
        nl = chunk.find(b"\n")
        if chunk.startswith(b"data: ", nl + 1) and chunk.find(b"\n", nl + 1) == end and chunk[-1] == 0x0A:
            return chunk[7:nl], chunk[nl + 7 : end]
    if chunk.find(b"\n\n") == end:
        return _event(chunk[:end])
    return None


def _event(block: bytes) -> Event | None:
    """The event of one blank-line-free block of LF-separated lines; None without data."""
    # The shapes providers send, without splitting lines: `data: X` and `event: N\ndata: X`.
    if block.startswith(b"data: "):
        if block.find(b"\n") < 0:
            return b"", block[6:]
    elif block.startswith(b"event: "):
        nl = block.find(b"\n")
        if nl > 0 and block.startswith(b"data: ", nl + 1) and block.find(b"\n", nl + 1) < 0:
            return block[7:nl], block[nl + 7 :]
    name = b""
    data: list[bytes] | None = None
    for line in block.split(b"\n"):
        colon = line.find(b":")
        if colon <= 0:
            if colon == 0 or not line:
                continue  # comment / keep-alive, or a leading blank line
            field, value = line, b""
        else:
            field = line[:colon]
            value = line[colon + 2 :] if line[colon + 1 : colon + 2] == b" " else line[colon + 1 :]
        if field == b"data":
            if data is None:
                data = [value]
            else:
                data.append(value)
        elif field == b"event":
            name = value
        # `id`, `retry` and unknown fields do not matter for metering.
    if data is None:
        return None
    return name, data[0] if len(data) == 1 else b"\n".join(data)


def _to_lf(chunk: bytes) -> bytes:
    chunk = chunk.replace(b"\r\n", b"\n")
    return chunk.replace(b"\r", b"\n") if chunk.find(b"\r") >= 0 else chunk
