"""Claude through the gateway with the official `anthropic` SDK, against the fake upstream."""

from __future__ import annotations

from collections.abc import Callable

import anthropic
import httpx
import pytest

from tests.conftest import ANTHROPIC_KEY, Gateway, fixture_bytes
from tests.fakes.upstream import FakeUpstream, Reply

MSG = [{"role": "user", "content": "Hello"}]


def client(gw: Gateway, key: str, **kw: object) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, **kw)  # type: ignore[arg-type]


def test_message_is_metered_and_key_replaced(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("alice")
    msg = client(gateway, key).messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MSG)
    assert msg.usage.input_tokens == 12 and msg.usage.output_tokens == 9
    rows = gateway.wait_recorded("alice")
    assert rows[0]["outcome"] == "ok" and rows[0]["status_code"] == 200 and rows[0]["model"] == "claude-sonnet-4-6"
    assert gateway.events("alice") == {"claude_input_tokens": 12, "claude_output_tokens": 9}
    sent = upstream.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.header("x-api-key") == ANTHROPIC_KEY
    assert sent.header("authorization") is None
    assert key not in repr(sent.headers)
    assert sent.header("anthropic-version") == "2026-10-21"
    assert sent.body == b'{"max_tokens":64,"messages":[{"role":"user","content":"Hello"}],"model":"claude-sonnet-4-6"}'


def test_stream_relayed_byte_for_byte_and_metered(gateway: Gateway) -> None:
    key = gateway.issue_key("bob")
    body = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": MSG, "stream": True}
    with httpx.Client(timeout=10) as http:
        resp = http.post(f"{gateway.url}/anthropic/v1/messages", json=body, headers={"x-api-key": key})
    assert resp.status_code == 200
    assert resp.content == fixture_bytes("anthropic/stream_text.sse")
    gateway.wait_recorded("bob")
    assert gateway.events("bob") == {"claude_input_tokens": 25, "claude_output_tokens": 15}


def test_sdk_stream_helper(gateway: Gateway) -> None:
    key = gateway.issue_key("carol")
    with client(gateway, key).messages.stream(model="claude-sonnet-4-6", max_tokens=64, messages=MSG) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello! How can I help?"
    assert final.usage.output_tokens == 15
    gateway.wait_recorded("carol")
    assert gateway.events("carol") == {"claude_input_tokens": 25, "claude_output_tokens": 15}


def test_invalid_key_is_401_and_upstream_not_called(gateway: Gateway, upstream: FakeUpstream) -> None:
    before = len(upstream.requests)
    with pytest.raises(anthropic.AuthenticationError) as err:
        client(gateway, "pgw_not-a-real-key").messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=MSG)
    assert err.value.status_code == 401
    assert err.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid or revoked gateway key"},
    }
    assert len(upstream.requests) == before


STREAM = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": MSG, "stream": True}
BROKE = {"type": "error", "error": {"type": "api_error", "message": "the provider connection broke mid-response"}}
STALLED = {"type": "error", "error": {"type": "timeout_error", "message": "the provider stalled mid-response"}}
_TEXT = fixture_bytes("anthropic/stream_text.sse")
_DELTA = _TEXT.index(b"event: content_block_delta")  # the first text delta ("Hello")


@pytest.mark.parametrize(
    "cut",
    [
        _DELTA,  # between events
        _DELTA + len(b"event: content_bl"),  # inside the `event:` line
        _TEXT.index(b"\n", _DELTA) + 1,  # after the `event:` line
        _TEXT.index(b"Hello"),  # inside the `data:` line
        _TEXT.index(b"\n\n", _DELTA) + 1,  # after the `data:` line, before its blank line
    ],
    ids=["between events", "in the event line", "after the event line", "in the data line", "before the blank line"],
)
@pytest.mark.parametrize("stall", [False, True], ids=["broken", "stalled"])
def test_stream_cut_mid_event_ends_with_an_error_the_sdk_raises(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream, cut: int, stall: bool
) -> None:
    # A connection breaks (or stalls) wherever a TCP segment ends, mostly inside an event. The gateway's
    # error event must still reach the SDK as an error, not be glued into the partial event's lines (a
    # JSONDecodeError, a garbled message, or an event name the SDK ignores: a stream that ends "fine"):
    # the partial event is never relayed, and the error event follows the last whole one.
    gateway = make_gateway(upstream_timeout_seconds=0.5)
    key = gateway.issue_key(f"cut{cut}")
    upstream.enqueue(Reply.cut(_TEXT, cut, stall=stall))
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as err:
        for event in client(gateway, key, max_retries=0).messages.create(**STREAM):  # type: ignore[call-overload]
            seen.append(event.type)
    assert err.value.status_code == 200
    assert err.value.body == (STALLED if stall else BROKE)
    assert seen == ["message_start", "content_block_start"]  # the ping is skipped; the cut delta never completed
    rows = gateway.wait_recorded(f"cut{cut}")
    assert rows[0]["outcome"] == ("timeout" if stall else "upstream_broken")
    assert gateway.events(f"cut{cut}") == {"claude_input_tokens": 25, "claude_output_tokens": 1}


def test_stream_cut_into_reads_anywhere_is_relayed_byte_for_byte(gateway: Gateway, upstream: FakeUpstream) -> None:
    # Events held back until whole leave the bytes as they were; a last event without its blank line
    # (a stream that ended so) is relayed as it is.
    key = gateway.issue_key("reads")
    cuts = [1, _DELTA - 1, _DELTA + 5, _TEXT.index(b"Hello"), len(_TEXT) - 1]
    chunks = [_TEXT[a:b] for a, b in zip([0, *cuts], [*cuts, len(_TEXT)], strict=True)]
    for sent in (chunks, chunks[:-1]):
        upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")], chunks=sent, delay_between=0.01))
        with httpx.Client(timeout=10) as http:
            resp = http.post(f"{gateway.url}/anthropic/v1/messages", json=STREAM, headers={"x-api-key": key})
        assert resp.status_code == 200 and resp.content == b"".join(sent)
    gateway.wait_recorded("reads", 2)
    assert gateway.events("reads") == {"claude_input_tokens": 2 * 25, "claude_output_tokens": 2 * 15}


def test_compaction_iterations_are_billed(gateway: Gateway, upstream: FakeUpstream) -> None:
    # Server-side compaction: the summarising step's tokens are billed but are not in the top-level usage.
    compaction = {"type": "compaction", "input_tokens": 180000, "output_tokens": 3500}
    answer = {"type": "message", "input_tokens": 23000, "output_tokens": 1000}
    usage = {
        "input_tokens": 23000,
        "output_tokens": 1000,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "iterations": [{**compaction, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}, answer],
    }
    message = {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "usage": usage}
    upstream.enqueue(Reply.json(message))
    key = gateway.issue_key("compact")
    with httpx.Client(timeout=10) as http:
        resp = http.post(
            f"{gateway.url}/anthropic/v1/messages?beta=true",
            json={"model": "claude-sonnet-4-6", "max_tokens": 4096, "messages": MSG},
            headers={"x-api-key": key, "anthropic-beta": "compact-2026-01-12"},
        )
    assert resp.status_code == 200
    gateway.wait_recorded("compact")
    assert gateway.events("compact") == {"claude_input_tokens": 203000, "claude_output_tokens": 4500}
