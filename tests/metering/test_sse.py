"""SSEParser framing: line endings, field syntax and arbitrary chunk boundaries."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gateway.metering.sse import SSEParser

FIXTURES = Path(__file__).parent.parent / "fixtures"
SSE_FIXTURES = sorted(p.relative_to(FIXTURES).as_posix() for p in FIXTURES.glob("*/*.sse"))


def parse(*chunks: bytes) -> list[tuple[bytes, bytes]]:
    p = SSEParser()
    out: list[tuple[bytes, bytes]] = []
    for c in chunks:
        out.extend(p.feed(c))
    return out


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    body = eol.join([b"event: a", b"data: 1", b"", b"data: 2", b"data: 3", b"", b""])
    assert parse(body) == [(b"a", b"1"), (b"", b"2\n3")]


def test_mixed_line_endings() -> None:
    assert parse(b"event: x\rdata: 1\r\n\ndata: 2\n\r") == [(b"x", b"1"), (b"", b"2")]


def test_crlf_split_between_chunks_is_one_line_ending() -> None:
    # If the LF after a chunk-final CR were a second line ending, "a" would be dispatched alone.
    assert parse(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [(b"", b"a\nb")]


def test_cr_at_chunk_end_followed_by_other_data() -> None:
    assert parse(b"data: a\r", b"\r") == [(b"", b"a")]
    assert parse(b"data: a\r", b"", b"\r") == [(b"", b"a")]


def test_field_syntax() -> None:
    body = b": comment line\ndata:nospace\ndata:  two spaces\ndata\nid: 7\nretry: 100\nunknown: x\nevent:named\n\n"
    assert parse(body) == [(b"named", b"nospace\n two spaces\n")]


def test_event_without_data_is_not_dispatched_and_name_resets() -> None:
    assert parse(b"event: ping\n\ndata: x\n\n") == [(b"", b"x")]
    assert parse(b"event: a\ndata: 1\n\ndata: 2\n\n") == [(b"a", b"1"), (b"", b"2")]


def test_comment_only_and_blank_lines_dispatch_nothing() -> None:
    assert parse(b":keepalive\n\n\n\n") == []


def test_leading_bom_is_ignored_once() -> None:
    bom = b"\xef\xbb\xbf"
    assert parse(bom[:2], bom[2:] + b"data: 1\n\n") == [(b"", b"1")]


def test_incomplete_trailing_event_is_not_dispatched() -> None:
    p = SSEParser()
    assert p.feed(b"data: 1\n\ndata: 2\n") == [(b"", b"1")]
    assert p.feed(b"data: 3") == []


def test_utf8_split_inside_character() -> None:
    body = 'data: {"t":"héllo ☃"}\n\n'.encode()
    i = body.index("☃".encode()) + 1
    assert parse(body[:i], body[i:]) == [(b"", '{"t":"héllo ☃"}'.encode())]


def test_long_line_in_many_chunks() -> None:
    payload = b"A" * 200_000
    body = b"data: " + payload + b"\r\n\r\n"
    chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
    assert parse(*chunks) == [(b"", payload)]


@pytest.mark.parametrize("name", SSE_FIXTURES)
def test_fixture_every_split_point(name: str) -> None:
    body = (FIXTURES / name).read_bytes()
    whole = parse(body)
    assert whole, name
    for i in range(len(body) + 1):
        assert parse(body[:i], body[i:]) == whole, i
    assert parse(*(body[i : i + 1] for i in range(len(body)))) == whole


@pytest.mark.parametrize("name", SSE_FIXTURES)
def test_fixture_random_multi_splits(name: str) -> None:
    body = (FIXTURES / name).read_bytes()
    whole = parse(body)
    rng = random.Random(name)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(body)), k=rng.randint(1, 12)))
        parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        assert parse(*parts) == whole


def test_fixture_event_counts() -> None:
    assert [e for e, _ in parse((FIXTURES / "anthropic/stream_text.sse").read_bytes())] == [
        b"message_start",
        b"content_block_start",
        b"ping",
        b"content_block_delta",
        b"content_block_delta",
        b"content_block_stop",
        b"message_delta",
        b"message_stop",
    ]
    crlf = parse((FIXTURES / "edge/anthropic_stream_crlf.sse").read_bytes())
    assert crlf == parse((FIXTURES / "anthropic/stream_text.sse").read_bytes())
    gem = parse((FIXTURES / "gemini/stream_generate_content.sse").read_bytes())
    assert len(gem) == 3 and all(name == b"" and d.startswith(b'{"candidates"') for name, d in gem)
    assert parse((FIXTURES / "edge/gemini_stream_data_nospace.sse").read_bytes()) == gem
    assert parse((FIXTURES / "edge/gemini_stream_lf.sse").read_bytes()) == gem
