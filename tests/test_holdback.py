"""The relay's event boundary finder and hold-back, on their own (see gateway.holdback)."""

from __future__ import annotations

import itertools

import pytest

from gateway.holdback import event_end, release, settle
from gateway.metering import AnthropicStreamMeter, GeminiSSEMeter, StreamMeter
from gateway.metering.sse import BLANK_LINE_ENDS


def reference_end(text: bytes) -> int:
    """`event_end` as the SSE spec reads it, line by line. `text` may start anywhere in a line, so a line
    end at its start is taken for the end of a line (at an event boundary it would be an empty line, and
    leaving it with the next event changes nothing)."""
    end, i, previous_was_line_end = 0, 0, False
    while i < len(text):
        if text[i] == 0x0A or text[i] == 0x0D:
            if text[i] == 0x0D:
                if i + 1 == len(text):
                    break  # a final CR may be half of a CRLF: undecided yet
                if text[i + 1] == 0x0A:
                    i += 1
            i += 1
            if previous_was_line_end:
                end = i
            previous_was_line_end = True
        else:
            previous_was_line_end = False
            i += 1
    return end


def test_event_end_of_each_framing() -> None:
    assert event_end(b"data: 1\n\n") == 9
    assert event_end(b"data: 1\r\n\r\n") == 11
    assert event_end(b"data: 1\r\rdata") == 9
    assert event_end(b"event: a\ndata: 1\n\nevent: b\ndata") == 18
    assert event_end(b"data: 1\r\n\r\ndata: 2\r\n") == 11
    assert event_end(b"data: 1\n") == 0
    assert event_end(b"") == 0


def test_a_crlf_split_after_its_cr_does_not_end_an_event_yet() -> None:
    assert event_end(b"data: 1\r\n\r") == 0  # the LF may follow: undecided
    assert event_end(b"data: 1\r\r") == 0
    assert event_end(b"data: 1\r\n\rd") == 10  # a lone CR after all
    assert event_end(b"data: 1\r\n\r\n") == 11
    assert event_end(b"data: 1\n\n\r") == 9  # the last event; the CR starts whatever comes next


@pytest.mark.parametrize("length", range(1, 8))
def test_event_end_agrees_with_the_spec_on_every_short_text(length: int) -> None:
    for text in map(bytes, itertools.product(b"a\r\n", repeat=length)):
        assert event_end(text) == reference_end(text), text


def test_blank_line_ends_end_an_event() -> None:
    # The meters' own fast paths leave their parser idle after such a chunk.
    for text in map(bytes, itertools.product(b"a\r\n", repeat=5)):
        if text.endswith(BLANK_LINE_ENDS):
            assert event_end(text) == len(text), text


@pytest.mark.parametrize("meter", [AnthropicStreamMeter, GeminiSSEMeter])
def test_an_idle_parser_means_the_bytes_fed_end_with_a_whole_event(meter: type[StreamMeter]) -> None:
    # The relay sends a chunk as it is, nothing held, when the meter's parser is idle after it: that
    # must never be said of bytes that end inside an event (the relay would send its first part).
    tokens = (b'data: {"type":"message_stop"}', b"event: x", b"\r", b"\n")
    for parts in itertools.product(tokens, repeat=5):
        text = b"".join(parts)
        for cut in range(1, len(text)):
            m = meter()
            for fed in (text[:cut], text):
                m.feed(fed[cut:] if fed is text else fed)
                sse = m.sse
                assert sse is not None
                if sse.idle:
                    assert event_end(fed) == len(fed), (fed, cut)


STREAM = b'data: {"a":1}\r\n\r\ndata: {"b":2}\r\n\r\nevent: c\ndata: 3\n\n: ping\r\rdata: {"d":4}\r\n\r\n'


def relay(chunks: list[bytes]) -> list[bytes]:
    """What `release` sends of `chunks`, one entry per chunk (b"": nothing sent)."""
    held: list[bytes] = []
    return [release(held, chunk) for chunk in chunks] + [b"".join(held)]


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_release_sends_whole_events_however_the_stream_is_cut(cut: int) -> None:
    sent = relay([STREAM[:cut], STREAM[cut:]])
    assert b"".join(sent) == STREAM  # every byte, in order
    assert sent[0] == STREAM[: reference_end(STREAM[:cut])]  # up to the last event the first part completed


def test_release_of_one_byte_reads() -> None:
    held: list[bytes] = []
    sent = b""
    for i in range(len(STREAM)):
        sent += release(held, STREAM[i : i + 1])
        assert sent == STREAM[: reference_end(STREAM[: i + 1])]
    assert not held


def test_a_huge_event_is_gathered_in_parts() -> None:
    held: list[bytes] = []
    head = b'data: {"image":"'
    assert release(held, head) == b""
    for _ in range(100):
        assert release(held, b"A" * 1000) == b""
    assert len(held) == 101  # kept as they came: nothing joined before the event completes
    assert release(held, b'"}\r\n\r\ndata: {"n"') == head + b"A" * 100_000 + b'"}\r\n\r\n'
    assert held == [b'data: {"n"']


def test_a_chunk_that_ends_an_event_is_sent_without_a_copy() -> None:
    chunk = b"data: 1\r\n\r\n"
    assert release([], chunk) is chunk


@pytest.mark.parametrize(
    ("parts", "sent"),
    [
        ([], b""),
        ([b"data: {"], b""),  # a partial event: dropped
        ([b"data: 1\r\n\r"], b"data: 1\r\n\r\n"),  # complete once nothing can follow: its CRLF whole
        ([b"data: 1\r\n", b"\r"], b"data: 1\r\n\r\n"),
        ([b"data: 1\r", b"\r"], b"data: 1\r\r\n"),
        ([b"data: 1\r"], b""),  # its first line only
        ([b"\r"], b""),
    ],
)
def test_settle_at_a_break(parts: list[bytes], sent: bytes) -> None:
    held = list(parts)
    assert settle(held) == sent
    assert held == []
