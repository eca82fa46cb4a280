"""Incremental splitter for a JSON array that arrives piece by piece.

Gemini's streamGenerateContent without `alt=sse` writes one JSON array over time
(`[{...}\\r\\n,{...}\\r\\n]`, pretty-printed). Each element must be metered as soon as it
is complete, without waiting for (or buffering) the whole body. The scanner only looks
at structural bytes, jumping between them with a compiled regex and `bytes.find`, so
long strings (base64 images) are skipped at C speed.
"""

from __future__ import annotations

import re

# Outside strings only quotes and brackets matter; commas/whitespace are implied by depth.
_STRUCT = re.compile(rb'["{}\[\]]')
_QUOTE = 0x22
_BACKSLASH = 0x5C
_LBRACKET = 0x5B
_OPEN = frozenset(b"{[")


class JSONArrayScanner:
    """Yields each complete top-level element of a streamed JSON array as raw bytes.

    A top-level object instead of an array (a plain error body) is returned as one
    element. Elements that are not containers (scalars) are ignored. `done` turns True
    once the top-level value has been closed.
    """

    __slots__ = ("_base", "_buf", "_depth", "_in_str", "_pos", "_start", "done")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # next byte of _buf to scan
        self._depth = 0
        self._base = -1  # depth at which elements start: 1 in an array, 0 for a bare object
        self._in_str = False
        self._start = -1  # offset in _buf of the element being collected
        self.done = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """Consume one chunk; return the elements it completed, in order."""
        if self.done or not chunk:
            return []
        buf = self._buf
        buf += chunk
        out: list[bytes] = []
        pos, depth, in_str, start, base = self._pos, self._depth, self._in_str, self._start, self._base
        n = len(buf)
        while pos < n:
            if in_str:
                q = buf.find(b'"', pos)
                if q < 0:
                    pos = n
                    break
                pos = q + 1
                k = q - 1
                while k >= 0 and buf[k] == _BACKSLASH:
                    k -= 1
                if (q - 1 - k) % 2 == 0:  # even run of backslashes: the quote is real
                    in_str = False
                continue
            m = _STRUCT.search(buf, pos)
            if m is None:
                pos = n
                break
            i = m.start()
            c = buf[i]
            pos = i + 1
            if c == _QUOTE:
                in_str = True
            elif c in _OPEN:
                if base < 0:
                    base = 1 if c == _LBRACKET else 0
                if depth == base:
                    start = i
                depth += 1
            else:
                depth -= 1
                if depth == base and start >= 0:
                    out.append(bytes(buf[start : i + 1]))
                    start = -1
                if depth <= 0:
                    self.done = True
                    break
        if start < 0 and not in_str:
            del buf[:pos]  # nothing before pos is needed any more
            pos = 0
        elif start > 0:
            del buf[:start]  # keep only the element in flight
            pos -= start
            start = 0
        self._pos, self._depth, self._in_str, self._start, self._base = pos, depth, in_str, start, base
        if self.done:
            self._buf = bytearray()
        return out
