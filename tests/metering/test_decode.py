"""ContentDecoder: incremental gzip/deflate decoding of a copy of the relayed bytes."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import pytest

from gateway.metering import AnthropicStreamMeter, ContentDecoder, GeminiSSEMeter
from gateway.meters import CLAUDE_OUTPUT, GEMINI_OUTPUT

FIXTURES = Path(__file__).parent.parent / "fixtures"
PLAIN = (FIXTURES / "anthropic/stream_thinking_tool_use.sse").read_bytes()


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def decode_all(encoding: str | None, body: bytes, step: int) -> bytes:
    d = ContentDecoder.for_encoding(encoding)
    out = b"".join(d.decode(body[i : i + step]) for i in range(0, len(body), step))
    assert not d.failed
    return out + d.flush()


ENCODED = {
    "gzip": gzip.compress(PLAIN),
    "x-gzip": gzip.compress(PLAIN, compresslevel=1),
    "GZip": gzip.compress(PLAIN),
    "deflate": zlib.compress(PLAIN),
    " Deflate ": zlib.compress(PLAIN, 9),
}


@pytest.mark.parametrize("encoding", sorted(ENCODED))
@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 1 << 20])
def test_gzip_and_zlib_deflate_tiny_chunks(encoding: str, step: int) -> None:
    assert decode_all(encoding, ENCODED[encoding], step) == PLAIN


@pytest.mark.parametrize("step", [1, 2, 5, 1 << 20])
def test_raw_deflate(step: int) -> None:
    assert decode_all("deflate", raw_deflate(PLAIN), step) == PLAIN


@pytest.mark.parametrize("step", [1, 2, 3, 100])
def test_raw_deflate_that_looks_like_a_zlib_header(step: int) -> None:
    # Non-final stored block whose padding bits make byte 0 = 0x78 and LEN = 1, so the
    # first two bytes are the classic zlib header 78 01; zlib then fails and we replay raw.
    body = b"\x78\x01\x00\xfe\xffA" + raw_deflate(b"BC")
    assert body[:2] == b"\x78\x01"
    assert decode_all("deflate", body, step) == b"ABC"


@pytest.mark.parametrize("encoding", [None, "", "identity", "IDENTITY", "gzip, identity", "identity,deflate"])
def test_identity_and_lists(encoding: str | None) -> None:
    d = ContentDecoder.for_encoding(encoding)
    assert d.supported
    body = PLAIN
    if encoding and "gzip" in encoding:
        body = gzip.compress(PLAIN)
    elif encoding and "deflate" in encoding:
        body = zlib.compress(PLAIN)
    assert decode_all(encoding, body, 5) == PLAIN


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br", "gzip, gzip"])
def test_unsupported(encoding: str) -> None:
    d = ContentDecoder.for_encoding(encoding)
    assert not d.supported
    assert d.decode(b"anything") == b""
    assert d.flush() == b""


def test_multi_member_gzip() -> None:
    half = len(PLAIN) // 2
    body = gzip.compress(PLAIN[:half]) + gzip.compress(PLAIN[half:])
    for step in (1, 13, len(body)):
        assert decode_all("gzip", body, step) == PLAIN


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_corrupt_input_marks_failed_without_raising(encoding: str) -> None:
    d = ContentDecoder.for_encoding(encoding)
    garbage = b"\x1f\x8b\x09" + b"\xff" * 64 if encoding == "gzip" else b"\x78\x9c" + b"\xff" * 64
    out = b"".join(d.decode(garbage[i : i + 4]) for i in range(0, len(garbage), 4))
    assert out == b""
    assert d.failed
    assert d.decode(b"more") == b"" and d.flush() == b""


def test_decoded_stream_feeds_meters() -> None:
    d = ContentDecoder.for_encoding("gzip")
    m = AnthropicStreamMeter()
    body = gzip.compress(PLAIN)
    for i in range(0, len(body), 3):
        m.feed(d.decode(body[i : i + 3]))
    m.feed(d.flush())
    assert m.usage().meters[CLAUDE_OUTPUT] == 89 and m.usage().final

    gem = (FIXTURES / "gemini/stream_generate_content.sse").read_bytes()
    d = ContentDecoder.for_encoding("deflate")
    g = GeminiSSEMeter()
    body = zlib.compress(gem)
    for i in range(0, len(body), 2):
        g.feed(d.decode(body[i : i + 2]))
    assert g.usage().meters[GEMINI_OUTPUT] == 296 and g.usage().final
