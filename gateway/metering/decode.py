"""Incremental Content-Encoding decoding for the metering side of the relay.

The relay forwards upstream bytes still compressed (and keeps `content-encoding` and
`content-length` valid); metering needs plaintext, so it decodes a copy chunk by chunk.
Decoding never raises into the relay: corrupt input marks the decoder `failed` and the
meter simply stops seeing bytes.
"""

from __future__ import annotations

import zlib

_IDENTITY = frozenset({"", "identity"})
_GZIP = frozenset({"gzip", "x-gzip"})


def _looks_zlib(head: bytes) -> bool:
    """RFC 1950 header check: CM=8, window <= 32K, and the 16-bit header divisible by 31."""
    cmf, flg = head[0], head[1]
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and ((cmf << 8) | flg) % 31 == 0


class ContentDecoder:
    """Decodes one response body incrementally; build it with `for_encoding`."""

    __slots__ = ("_head", "_mode", "_obj", "_replay", "failed", "identity", "supported")

    def __init__(self, mode: str) -> None:
        self._mode = mode  # "identity", "gzip", "deflate" or "unsupported"
        self.supported = mode != "unsupported"
        self.identity = mode == "identity"  # `decode` returns its chunk: a caller may skip the call
        self.failed = False
        self._obj: zlib._Decompress | None = None
        self._head = b""  # deflate: first bytes, held until the wrapper can be sniffed
        self._replay: bytearray | None = None
        if mode == "gzip":
            self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)

    @classmethod
    def for_encoding(cls, content_encoding: str | None) -> ContentDecoder:
        """Decoder for a Content-Encoding header value (case-insensitive; None = identity).

        A list such as "gzip, identity" is accepted when at most one real coding remains;
        stacked codings and unknown ones (br, zstd, compress) are reported unsupported.
        """
        if not content_encoding:
            return _IDENTITY_DECODER  # stateless in identity mode: one instance serves every response
        codings = [c.strip().lower() for c in content_encoding.split(",")]
        real = [c for c in codings if c not in _IDENTITY]
        if not real:
            return cls("identity")
        if len(real) > 1:
            return cls("unsupported")
        coding = real[0]
        if coding in _GZIP:
            return cls("gzip")
        if coding == "deflate":
            return cls("deflate")
        return cls("unsupported")

    def decode(self, chunk: bytes) -> bytes:
        """Plaintext for this chunk (possibly b"" while the decompressor buffers)."""
        if self._mode == "identity":
            return chunk
        if not self.supported or self.failed or not chunk:
            return b""
        try:
            if self._mode == "gzip":
                return self._gzip(chunk)
            return self._deflate(chunk)
        except zlib.error:
            self.failed = True
            return b""

    def flush(self) -> bytes:
        """Whatever the decompressor still holds; call once at end of body."""
        if self._obj is None or self.failed:
            return b""
        try:
            return self._obj.flush()
        except zlib.error:
            self.failed = True
            return b""

    def _gzip(self, chunk: bytes) -> bytes:
        obj = self._obj
        assert obj is not None
        out = obj.decompress(chunk)
        # Concatenated gzip members are legal (RFC 1952); start a new one on leftover bytes.
        while obj.eof and obj.unused_data:
            rest = obj.unused_data
            obj = self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += obj.decompress(rest)
        return out

    def _deflate(self, chunk: bytes) -> bytes:
        # HTTP "deflate" should be zlib-wrapped (RFC 9110) but some servers send raw deflate.
        if self._obj is None:
            self._head += chunk
            if len(self._head) < 2:
                return b""
            chunk, self._head = self._head, b""
            wrapped = _looks_zlib(chunk)
            self._obj = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            # A raw stream can pass the header check by chance; keep the input for a retry.
            self._replay = bytearray() if wrapped else None
        if self._replay is not None:
            self._replay += chunk
        try:
            out = self._obj.decompress(chunk)
        except zlib.error:
            if self._replay is None:
                raise
            replay, self._replay = bytes(self._replay), None
            self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
            out = self._obj.decompress(replay)
        if out:
            self._replay = None  # the guess produced plaintext: it was right
        return out


_IDENTITY_DECODER = ContentDecoder("identity")
