"""The metering fast paths (whole-event chunks, needle filtering) against the line-at-a-time oracle.

The shipped parser skips chunks and events by raw-byte scans; these tests require it,
and the meters on it, to agree exactly with `_reference` on every fixture and on
adversarial streams, however the relay's chunks were cut.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from gateway.metering import AnthropicStreamMeter, GeminiSSEMeter, StreamMeter, usage_from_response
from gateway.metering import anthropic as anthropic_module
from gateway.metering import sse as sse_module
from gateway.metering.anthropic import _NEEDLES
from gateway.metering.sse import SSEParser
from gateway.meters import CLAUDE_OUTPUT, GEMINI_IMAGES

from ._reference import ReferenceSSEParser, reference_anthropic, reference_gemini
from ._split import assert_split_invariant, run

FIXTURES = Path(__file__).parent.parent / "fixtures"
BOM = b"\xef\xbb\xbf"
ANTHROPIC = sorted(
    p.relative_to(FIXTURES).as_posix()
    for p in [*FIXTURES.glob("anthropic/*.sse"), *FIXTURES.glob("edge/anthropic_*.sse")]
)
GEMINI = sorted(
    p.relative_to(FIXTURES).as_posix() for p in [*FIXTURES.glob("gemini/*.sse"), *FIXTURES.glob("edge/gemini_*.sse")]
)


def sse(*events: tuple[str, object]) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (n.encode(), orjson.dumps(d)) for n, d in events)


def delta(text: str) -> tuple[str, object]:
    return "content_block_delta", {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    }


START = {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}}

# Content that mentions the names the meter looks for (the needle scan keeps it, so the
# meter must drop it by name), and framing a shortcut could misread.
TRAPS = (
    sse(
        ("message_start", START),
        delta('event: message_delta\ndata: {"usage":{"output_tokens":999}}\n\n'),
        delta('"type":"message_delta" and "type": "error"'),
        delta("an error occurred in message_stop"),
        ("ping", {"type": "ping"}),
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 7}}),
        ("message_stop", {"type": "message_stop"}),
    )
    + b": keep-alive mentioning message_delta and error\n\n\n\n"
    + b'data: {"type":"content_block_delta","delta":{"text":"\\"type\\":\\"message_delta\\""}}\n\n'
    + b'event: message_delta\nid: 4\ndata: {"type":"message_delta",\ndata: "usage":{"output_tokens":8}}\n\n'
    + b'event:message_delta\ndata:{"type":"message_delta","usage":{"output_tokens":9}}\n\n'
    + b'event: content_block_delta\nevent: message_delta\ndata: {"usage":{"output_tokens":10}}\n\n'
    + b'event: message_delta\nevent: content_block_delta\ndata: {"usage":{"output_tokens":1000}}\n\n'
    + b'event: message_delta\n\ndata: {"usage":{"output_tokens":1001}}\n\n'
    + b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n'
    + b'data: {"type": "message_delta", "usage": {"output_tokens": 11}}\n\n'
    + b"event: content_block_delta\ndata: no json here\n\n"
)


def events_of(body: bytes) -> list[bytes]:
    """The body cut after each blank line, as providers (and nginx) write it."""
    ends = [m.end() for m in re.finditer(rb"\r\n\r\n|\n\n|\r\r", body)]
    return [body[a:b] for a, b in zip([0, *ends], [*ends, len(body)], strict=True) if a < b]


def chunkings(body: bytes) -> Iterator[list[bytes]]:
    """Event-aligned cuts, the same shifted so every chunk ends mid-event, and groups of events."""
    events = events_of(body)
    yield [body]
    yield events
    for k in (1, 2, 3, 5, 9, 40):
        ends = [sum(map(len, events[: i + 1])) + k for i in range(len(events))]
        cuts = [c for c in ends if 0 < c < len(body)]
        yield [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    for n in (2, 3):
        yield [b"".join(events[i : i + n]) for i in range(0, len(events), n)]


def variants(body: bytes) -> dict[str, bytes]:
    """The body with each line ending, a BOM, and without `event:` lines (types are sniffed)."""
    lf = body.replace(b"\r\n", b"\n")
    return {
        "as is": body,
        "lf": lf,
        "crlf": lf.replace(b"\n", b"\r\n"),
        "cr": lf.replace(b"\n", b"\r"),
        "bom": BOM + body,
        "no event lines": re.sub(rb"^event:[^\n]*\n", b"", lf, flags=re.M),
    }


def assert_same_as_reference(
    factory: Callable[[], StreamMeter], oracle: Callable[[], StreamMeter], body: bytes
) -> None:
    """Usage after every chunk equals the oracle's, and the end result is split-invariant."""
    whole = run(oracle, [body])
    for chunks in chunkings(body):
        meter, ref = factory(), oracle()
        for chunk in chunks:
            meter.feed(chunk)
            ref.feed(chunk)
            assert meter.usage() == ref.usage(), chunks
        assert meter.usage() == whole
    assert assert_split_invariant(factory, body) == whole


# --- meters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["as is", "crlf", "cr", "bom", "no event lines"])
@pytest.mark.parametrize("name", [*ANTHROPIC, "traps"])
def test_anthropic_meter_matches_reference(name: str, variant: str) -> None:
    body = TRAPS if name == "traps" else (FIXTURES / name).read_bytes()
    assert_same_as_reference(AnthropicStreamMeter, reference_anthropic, variants(body)[variant])


@pytest.mark.parametrize("variant", ["as is", "lf", "cr", "bom"])
@pytest.mark.parametrize("name", GEMINI)
def test_gemini_meter_matches_reference(name: str, variant: str) -> None:
    assert_same_as_reference(GeminiSSEMeter, reference_gemini, variants((FIXTURES / name).read_bytes())[variant])


def test_traps_usage() -> None:
    u = run(AnthropicStreamMeter, events_of(TRAPS))
    # 999, 1000 and 1001 sit in content, under a later `event:` line, or after the blank line.
    assert u.meters[CLAUDE_OUTPUT] == 11
    assert u.final and u.error == {"type": "overloaded_error"}


def test_pending_event_name_is_not_skipped() -> None:
    # The second chunk ends with a blank line and holds no needle, but the parser is not
    # idle: it completes the `message_delta` named in the first chunk.
    body = sse(("message_start", START), ("message_delta", {"usage": {"output_tokens": 42}}))
    cut = body.index(b"data", body.index(b"event: message_delta"))
    assert b"message_" not in body[cut:]
    assert run(AnthropicStreamMeter, [body[:cut], body[cut:]]).meters[CLAUDE_OUTPUT] == 42
    cr = body.replace(b"\n", b"\r\n")
    cut = cr.index(b"\n", cr.index(b"event: message_delta"))  # CR | LF split after the name
    assert run(AnthropicStreamMeter, [cr[:cut], cr[cut:]]).meters[CLAUDE_OUTPUT] == 42


def test_content_deltas_are_skipped_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    # An event is split into its fields by `_event`, or (a one-event chunk) by `lone_event`.
    parsed: list[bytes] = []
    real, real_lone = sse_module._event, anthropic_module.lone_event
    in_lone = False

    def spy(block: bytes) -> tuple[bytes, bytes] | None:
        if not in_lone:  # `lone_event` falling back to `_event` is one parse, counted there
            parsed.append(block)
        return real(block)

    def spy_lone(chunk: bytes) -> tuple[bytes, bytes] | None:
        nonlocal in_lone
        parsed.append(chunk)
        in_lone = True
        try:
            return real_lone(chunk)
        finally:
            in_lone = False

    monkeypatch.setattr(sse_module, "_event", spy)
    monkeypatch.setattr(anthropic_module, "lone_event", spy_lone)
    body = (FIXTURES / "anthropic/stream_thinking_tool_use.sse").read_bytes()
    assert run(AnthropicStreamMeter, events_of(body)) == run(reference_anthropic, [body])
    assert [b.split(b"\n")[0] for b in parsed] == [
        b"event: message_start",
        b"event: message_delta",
        b"event: message_stop",
    ]
    parsed.clear()
    assert run(AnthropicStreamMeter, [body]) == run(reference_anthropic, [body])  # by block, too
    assert len(parsed) == 3


def test_gemini_crlf_events_are_parsed_without_rewriting(monkeypatch: pytest.MonkeyPatch) -> None:
    """One event per read (the one-line path), several in one read (split on CRLF CRLF) or the whole
    response in the first read (no BOM can lead it): never rewritten to LF and split into blocks."""

    def boom(self: SSEParser, text: bytes) -> list[tuple[bytes, bytes]]:
        raise AssertionError("rewritten to LF and split")

    body = (FIXTURES / "gemini/stream_generate_content.sse").read_bytes()
    expected = run(reference_gemini, [body])
    first, *rest = events_of(body)
    monkeypatch.setattr(SSEParser, "_events", boom)
    for reads in ([first, *rest], [first, b"".join(rest)], [body]):
        meter = GeminiSSEMeter()
        for chunk in reads:
            meter.feed(chunk)
        assert meter.usage() == expected, reads


def test_crlf_multi_line_events_take_the_general_path() -> None:
    # Multi-line events, an extra blank line and a comment, all CRLF: the same events as the reference.
    crlf = b"event: a\r\ndata: 1\r\ndata: 2\r\n\r\n\r\n: note\r\ndata: 3\r\n\r\n"
    parser = SSEParser()
    parser.feed(b"data: 0\r\n\r\n")
    assert parser.feed(crlf) == [(b"a", b"1\n2"), (b"", b"3")]
    assert_parser_matches(b"data: 0\r\n\r\n" + crlf, [b"data: 0\r\n\r\n", crlf])
    for chunk in (
        b": ping\r\n\r\ndata: x\r\n\r\n\r\n\r\n",  # a comment, extra blank lines
        b"data: x\r\n\r\ndata: y\n\r\n",  # a different ending at the end
        b"data: x\r\n\r\n\r\ndata: y\r\n\r\n",  # an odd CRLF between events
        b"event: message_start\r\n\r\ndata\r\n\r\n",  # a name without data, data without a value
    ):
        assert_parser_matches(b"data: 0\r\n\r\n" + chunk, [b"data: 0\r\n\r\n", chunk])


def test_gemini_parts_of_any_json_type() -> None:
    parts = [
        1,
        None,
        2.5,
        True,
        "inlineData",
        ["inlineData"],
        {"inlineData": None, "inline_data": {"mimeType": "image/x"}},
    ]
    body = {"candidates": [{"content": {"parts": parts}}]}
    assert usage_from_response(body).meters[GEMINI_IMAGES] == 1


# --- parser ----------------------------------------------------------------------------------


def parse(parser: SSEParser | ReferenceSSEParser, chunks: list[bytes]) -> list[tuple[bytes, bytes]]:
    return [e for c in chunks for e in parser.feed(c)]


def assert_parser_matches(body: bytes, chunks: list[bytes]) -> None:
    expected = parse(ReferenceSSEParser(), chunks)
    assert parse(SSEParser(), chunks) == expected, chunks
    filtered = parse(SSEParser(only=_NEEDLES), chunks)
    assert filtered == parse(SSEParser(only=_NEEDLES), [body]), chunks  # chunking-independent
    it = iter(expected)
    assert all(any(e == r for r in it) for e in filtered), "not a subsequence of the oracle's events"
    must = [e for e in expected if any(n in e[0] or n in e[1] for n in _NEEDLES)]
    it = iter(filtered)
    assert all(any(e == f for f in it) for e in must), "an event holding a needle was dropped"


@pytest.mark.parametrize("name", [*ANTHROPIC, *GEMINI, "traps"])
def test_parser_matches_reference_on_fixtures(name: str) -> None:
    body = TRAPS if name == "traps" else (FIXTURES / name).read_bytes()
    for v in variants(body).values():
        for chunks in chunkings(v):
            assert_parser_matches(v, chunks)
        for i in range(0, len(v) + 1, 7):
            assert_parser_matches(v, [v[:i], v[i:]])


@pytest.mark.parametrize(
    "body",
    [
        BOM + b"data: 1\n\ndata: 2\n\n",
        BOM[:2] + b"xdata: 1\n\ndata: 2\n\n",  # not a BOM: nothing stripped
        b"data: 1\n\n" + BOM + b"data: 2\n\n",  # a BOM only counts at the start
        b"\r" + BOM + b"data: 1\r\n\r\n",
        BOM + BOM + b"data: 1\n\n",
    ],
)
def test_bom_only_at_the_start(body: bytes) -> None:
    for i in range(len(body) + 1):
        assert_parser_matches(body, [body[:i], body[i:]])
    assert_parser_matches(body, [body[i : i + 1] for i in range(len(body))])


TOKENS = [
    b"event: ",
    b"event:",
    b"data: ",
    b"data:",
    b"data",
    b"id: 1",
    b"retry: 5",
    b": ",
    b":",
    b" ",
    b"x",
    b"message_delta",
    b"message_stop",
    b"error",
    b"ping",
    b'{"type":"message_start"}',
    b'"type": "error"',
    b"\n",
    b"\n",
    b"\n",
    b"\n\n",
    b"\r",
    b"\r\n",
    b"\r\n\r\n",
    BOM,
]


def test_parser_matches_reference_on_random_streams() -> None:
    rng = random.Random(20240601)
    for _ in range(1500):
        body = b"".join(rng.choices(TOKENS, k=rng.randint(0, 40)))
        if rng.random() < 0.5:
            body = rng.choice([b"", BOM, BOM[:2]]) + body
        cuts = sorted({rng.randint(0, len(body)) for _ in range(rng.randint(0, 8))})
        parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        assert_parser_matches(body, parts)
        assert_parser_matches(body, events_of(body))
        # Chunks of whole events with mixed line endings, each starting idle.
        events = events_of(body)
        cuts = sorted(rng.sample(range(len(events) + 1), k=min(len(events) + 1, 3)))
        assert_parser_matches(
            body, [b"".join(events[a:b]) for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)]
        )
        assert_parser_matches(body, [body[i : i + 1] for i in range(len(body))])
