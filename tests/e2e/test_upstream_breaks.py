"""An upstream that breaks, stalls or ends a stream itself: billed what it reported, and only a
drain the gateway cut short is estimated."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Gateway, stream_and_leave
from tests.fakes.upstream import FIXTURES_DIR, FakeUpstream, Reply

BODY = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
STREAM_BODY = {**BODY, "stream": True}


def _post(gw: Gateway, key: str, path: str, json: object, headers: dict[str, str]) -> None:
    try:
        httpx.post(f"{gw.url}{path}", json=json, headers=headers, timeout=10)
    except httpx.HTTPError:
        pass  # the body is broken either way; what matters is how the request is billed


@pytest.mark.parametrize(
    ("path", "fixture", "auth"),
    [
        ("/anthropic/v1/messages", "anthropic/message.json", "x-api-key"),
        ("/gemini/v1beta/models/gemini-2.5-flash:generateContent", "gemini/generate_content.json", "x-goog-api-key"),
    ],
)
def test_broken_body_with_content_length_is_upstream_broken_not_gateway_error(
    gateway: Gateway, upstream: FakeUpstream, path: str, fixture: str, auth: str
) -> None:
    # The provider sends `content-length` and the connection breaks before the body is complete.
    key = gateway.issue_key("cl")
    upstream.enqueue(Reply.fixture(fixture, drop_after=0))
    body = BODY if "anthropic" in path else {"contents": [{"parts": [{"text": "Hi"}]}]}
    _post(gateway, key, path, body, {auth: key})
    rows = gateway.wait_recorded("cl")
    # README: truncated streams are recorded as `upstream_broken` with the usage reported so far (none here).
    assert rows[0]["outcome"] == "upstream_broken"
    assert rows[0]["estimated"] == 0
    assert gateway.events("cl") == {}


def test_stall_with_content_length_is_timeout_not_gateway_error(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    gw = make_gateway(upstream_timeout_seconds=0.5)
    key = gw.issue_key("clt")
    upstream.enqueue(Reply.fixture("gemini/generate_content.json", hang_after=0))
    _post(
        gw,
        key,
        "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
        {"contents": [{"parts": [{"text": "Hi"}]}]},
        {"x-goog-api-key": key},
    )
    rows = gw.wait_recorded("clt")
    assert rows[0]["outcome"] == "timeout"
    assert rows[0]["estimated"] == 0
    assert gw.events("clt") == {}


def test_disconnect_then_error_event_with_no_usage_bills_zero(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    # The client leaves; the provider then ends the stream itself with an `error` event and no usage.
    # The drain bound was never hit, so nothing is estimated: an upstream error without usage bills zero.
    gw = make_gateway(drain_timeout_seconds=30)
    key = gw.issue_key("gerr")
    ping = b'event: ping\ndata: {"type": "ping"}\n\n'
    error = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")], chunks=[ping, error], delay_between=0.8))
    stream_and_leave(gw.url, key, STREAM_BODY)
    rows = gw.wait_recorded("gerr", timeout=10)  # ended by the provider, long before the 30 s drain bound
    assert rows[0]["outcome"] == "client_disconnected"
    assert rows[0]["estimated"] == 0
    assert gw.events("gerr") == {}


def test_a_chunked_json_body_that_breaks_is_cut_not_given_an_sse_event(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    # Without a content-length the gateway could still append bytes: an SSE error event is for streams
    # only; a JSON body is left cut, so the client sees the break as the provider made it.
    key = gateway.issue_key("cj")
    data = (FIXTURES_DIR / "anthropic/message.json").read_bytes()
    upstream.enqueue(Reply(headers=[("content-type", "application/json")], chunks=[data[:40], data[40:]], drop_after=1))
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{gateway.url}/anthropic/v1/messages", json=BODY, headers={"x-api-key": key}, timeout=10)
    rows = gateway.wait_recorded("cj")
    assert (rows[0]["outcome"], rows[0]["estimated"]) == ("upstream_broken", 0)
    assert gateway.events("cj") == {}
