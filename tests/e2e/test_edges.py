"""Bad input, failing providers, broken streams and disconnects: clear errors, nothing lost."""

from __future__ import annotations

import gzip
import io
import logging
import socket
import zlib
from pathlib import Path

import anthropic
import httpx
import orjson
import pytest

from gateway.logs import JsonFormatter
from tests.conftest import Gateway, fixture_bytes, stream_and_leave, wait_until
from tests.fakes.upstream import FakeUpstream, Reply
from tests.support_db import Databases

BODY = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
STREAM_BODY = {**BODY, "stream": True}
PROMPT = "a confidential prompt that no log line may hold"


def post(gw: Gateway, key: str, path: str = "/anthropic/v1/messages", **kw: object) -> httpx.Response:
    headers = {"x-api-key": key, **kw.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.post(f"{gw.url}{path}", headers=headers, timeout=10, **kw)  # type: ignore[arg-type]


def test_malformed_json_is_400_and_not_forwarded(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("mal")
    resp = post(gateway, key, content=b'{"model": "claude', headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert resp.json()["error"]["message"].startswith("malformed JSON body")
    resp = post(
        gateway,
        key,
        path="/gemini/v1/models/gemini-2.5-flash:generateContent",
        content=b"[1, 2]",
        headers={"x-goog-api-key": key},
    )
    assert resp.status_code == 400 and resp.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert upstream.requests == [] and gateway.requests("mal") == []


def test_a_model_name_holding_nul_is_400_and_not_forwarded(  # type: ignore[no-untyped-def]
    make_gateway, databases: Databases, upstream: FakeUpstream
) -> None:
    # PostgreSQL refuses NUL in text: such a request's record could never be stored. It stayed in
    # the journal, unbilled, and the next start's recovery failed on it (the gateway never started).
    gw: Gateway = make_gateway(database_url=databases.new("nul", backend="postgres").url)
    key = gw.issue_key("nul")
    client = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="claude-sonnet-4-6\x00x", max_tokens=64, messages=BODY["messages"])  # type: ignore[arg-type]
    assert err.value.status_code == 400
    assert err.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert upstream.requests == [] and gw.requests("nul") == []


def test_oversized_body_is_413(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(max_body_bytes=1000)
    key = gw.issue_key("big")
    big = {**BODY, "messages": [{"role": "user", "content": "x" * 2000}]}
    resp = post(gw, key, json=big)
    assert resp.status_code == 413 and resp.headers["connection"] == "close"
    assert resp.json()["error"] == {
        "type": "request_too_large",
        "message": "request body exceeds the gateway limit of 1000 bytes",
    }
    assert upstream.requests == []


def test_unknown_routes_404_in_provider_shape(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("nf")
    resp = post(gateway, key, path="/anthropic/v1/messages/batches", json={"requests": []})
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found_error"
    resp = httpx.get(f"{gateway.url}/anthropic/v1/files", headers={"x-api-key": key})
    assert resp.status_code == 404 and resp.json()["type"] == "error"
    resp = post(gateway, key, path="/gemini/v1beta/files", json={})
    assert resp.status_code == 404 and resp.json()["error"]["status"] == "NOT_FOUND"
    resp = post(gateway, key, path="/gemini/v1/models/gemini-2.5-flash:embedContent", json={})
    assert resp.status_code == 404
    assert httpx.get(f"{gateway.url}/nope").status_code == 404
    assert upstream.requests == []


def test_models_routes_forwarded_unmetered(gateway: Gateway) -> None:
    key = gateway.issue_key("mo")
    c = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=key)
    assert [m.id for m in c.models.list()] == ["claude-sonnet-4-6"]
    assert c.models.retrieve("claude-sonnet-4-6").display_name == "Claude Sonnet 4.6"
    assert c.messages.count_tokens(model="claude-sonnet-4-6", messages=BODY["messages"]).input_tokens > 0  # type: ignore[arg-type]
    assert gateway.requests("mo") == []


def test_hanging_upstream_gets_504(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(upstream_timeout_seconds=0.5)
    key = gw.issue_key("hang")
    upstream.enqueue(Reply.fixture("anthropic/message.json", delay_before=30))
    c = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as err:
        c.messages.create(**BODY)  # type: ignore[arg-type]
    assert err.value.status_code == 504
    assert err.value.body["error"]["type"] == "timeout_error"  # type: ignore[index]
    rows = gw.wait_recorded("hang")
    assert rows[0]["outcome"] == "timeout" and rows[0]["status_code"] == 504
    assert gw.events("hang") == {}


def test_stream_stalling_midway_ends_with_error_event(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(upstream_timeout_seconds=0.5)
    key = gw.issue_key("stall")
    upstream.enqueue(Reply.fixture("anthropic/stream_text.sse", hang_after=2))
    resp = post(gw, key, json=STREAM_BODY)
    assert resp.status_code == 200
    events = fixture_bytes("anthropic/stream_text.sse").split(b"\n\n")
    assert resp.content.startswith(events[0] + b"\n\n" + events[1] + b"\n\n")
    assert resp.content.endswith(
        b'event: error\ndata: {"type":"error","error":{"type":"timeout_error",'
        b'"message":"the provider stalled mid-response"}}\n\n'
    )
    rows = gw.wait_recorded("stall")
    assert rows[0]["outcome"] == "timeout"
    assert gw.events("stall") == {"claude_input_tokens": 25, "claude_output_tokens": 1}
    wait_until(lambda: upstream.active_connections == 0)


def test_truncated_stream_keeps_usage_seen(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("trunc")
    upstream.enqueue(Reply.fixture("anthropic/stream_multiple_message_delta.sse", drop_after=5))
    resp = post(gateway, key, json=STREAM_BODY)
    assert resp.content.endswith(
        b'event: error\ndata: {"type":"error","error":{"type":"api_error",'
        b'"message":"the provider connection broke mid-response"}}\n\n'
    )
    rows = gateway.wait_recorded("trunc")
    assert rows[0]["outcome"] == "upstream_broken"
    # the first message_delta (output 40, one web search so far) is the last usage that arrived
    assert gateway.events("trunc") == {"claude_input_tokens": 25, "claude_output_tokens": 40, "claude_web_searches": 1}


def test_anthropic_midstream_error_event(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("mid")
    upstream.enqueue(Reply.fixture("anthropic/stream_error_midstream.sse"))
    c = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=key)
    with pytest.raises(anthropic.APIStatusError) as err:
        for _ in c.messages.create(**STREAM_BODY):  # type: ignore[arg-type]
            pass
    assert err.value.status_code == 200
    rows = gateway.wait_recorded("mid")
    assert rows[0]["outcome"] == "upstream_error_midstream"
    assert gateway.events("mid") == {"claude_input_tokens": 25, "claude_output_tokens": 1}


def test_multiple_message_deltas_take_last(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("md")
    upstream.enqueue(Reply.fixture("anthropic/stream_multiple_message_delta.sse"))
    post(gateway, key, json=STREAM_BODY)
    gateway.wait_recorded("md")
    assert gateway.events("md")["claude_output_tokens"] == 57


def test_cache_and_thinking_usage(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("cache")
    upstream.enqueue(Reply.fixture("anthropic/message_cache_thinking_servertool.json"))
    post(gateway, key, json=BODY)
    rows = gateway.wait_recorded("cache")
    assert gateway.events("cache") == {
        "claude_input_tokens": 21,
        "claude_output_tokens": 312,
        "claude_cache_write_tokens": 1800,  # all 5-minute writes: no claude_cache_write_1h_tokens
        "claude_cache_read_tokens": 3200,
        "claude_web_searches": 1,
    }
    assert '"thinking_tokens":240' in rows[0]["usage_raw"]


def test_client_disconnect_midstream_drains_full_usage(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("gone")
    upstream.enqueue(Reply.fixture("anthropic/stream_text.sse", delay_between=0.15))
    stream_and_leave(gateway.url, key, STREAM_BODY)
    rows = gateway.wait_recorded("gone", timeout=10)
    assert rows[0]["outcome"] == "client_disconnected" and rows[0]["estimated"] == 0
    assert gateway.events("gone") == {"claude_input_tokens": 25, "claude_output_tokens": 15}


def test_drain_bound_marks_estimated(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(drain_timeout_seconds=0.3)
    key = gw.issue_key("est")
    upstream.enqueue(Reply.fixture("anthropic/stream_text.sse", hang_after=3))
    with httpx.stream("POST", f"{gw.url}/anthropic/v1/messages", json=STREAM_BODY, headers={"x-api-key": key}) as r:
        next(r.iter_raw())
    rows = gw.wait_recorded("est", timeout=10)
    assert rows[0]["outcome"] == "client_disconnected" and rows[0]["estimated"] == 1
    assert gw.events("est") == {"claude_input_tokens": 25, "claude_output_tokens": 1}


def test_response_headers_relayed_cookies_dropped(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("hdr")
    upstream.enqueue(
        Reply.fixture(
            "anthropic/message.json",
            headers=[("x-multi", "a"), ("x-multi", "b"), ("set-cookie", "session=upstream-secret")],
        )
    )
    resp = post(gateway, key, json=BODY)
    assert resp.headers.get_list("x-multi") == ["a", "b"]
    assert "set-cookie" not in resp.headers
    assert resp.headers["x-gateway-request-id"].startswith("req_")
    assert resp.headers["request-id"].startswith("req_")


def test_gzip_relayed_compressed_and_metered(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("gz")
    upstream.enqueue(Reply.fixture("anthropic/message.json", gzip=True))
    with httpx.Client(timeout=10) as http:
        resp = http.post(
            f"{gateway.url}/anthropic/v1/messages",
            json=BODY,
            headers={"x-api-key": key, "accept-encoding": "gzip, br"},
        )
        raw = resp.content
    assert resp.headers["content-encoding"] == "gzip"
    assert raw == fixture_bytes("anthropic/message.json")
    assert upstream.requests[-1].header("accept-encoding") == "gzip"
    gateway.wait_recorded("gz")
    assert gateway.events("gz") == {"claude_input_tokens": 12, "claude_output_tokens": 9}
    assert gzip.compress(b"x")  # gzip module used for symmetry with the fake


def test_a_compressed_stream_that_breaks_is_left_cut_not_followed_by_plain_bytes(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    # The gateway's error event is plain text: after gzip bytes it would corrupt the body (the client
    # would inflate it as deflate data). A compressed stream cannot be cut at its events either, so it
    # is left cut as the provider left it, and the client sees the connection end mid-body.
    key = gateway.issue_key("gzcut")
    upstream.enqueue(Reply.fixture("anthropic/stream_text.sse", gzip=True, drop_after=3))
    body = {**BODY, "stream": True}
    raw, cut = b"", False
    headers = {"x-api-key": key, "accept-encoding": "gzip"}
    with httpx.stream("POST", f"{gateway.url}/anthropic/v1/messages", json=body, headers=headers, timeout=10) as r:
        assert r.headers["content-encoding"] == "gzip"
        try:
            for chunk in r.iter_raw():
                raw += chunk
        except httpx.RemoteProtocolError:
            cut = True
    assert cut
    relayed = zlib.decompressobj(wbits=31).decompress(raw)
    events = fixture_bytes("anthropic/stream_text.sse").split(b"\n\n")
    assert relayed == b"\n\n".join(events[:3]) + b"\n\n"  # the three events sent, nothing after them
    rows = gateway.wait_recorded("gzcut")
    assert rows[0]["outcome"] == "upstream_broken"
    assert gateway.events("gzcut") == {"claude_input_tokens": 25, "claude_output_tokens": 1}


@pytest.mark.parametrize("accepts", ["br", "zstd, br;q=0.5", "*", None])
def test_a_client_accepting_no_encoding_the_meter_reads_asks_the_provider_for_identity(
    gateway: Gateway, upstream: FakeUpstream, accepts: str | None
) -> None:
    # Without an Accept-Encoding any coding is acceptable (RFC 9110): a body in one the meter cannot
    # decode would be relayed and billed nothing.
    key = gateway.issue_key("enc")
    with httpx.Client(timeout=10) as http:
        headers = {"x-api-key": key} if accepts is None else {"x-api-key": key, "accept-encoding": accepts}
        request = http.build_request("POST", f"{gateway.url}/anthropic/v1/messages", json=BODY, headers=headers)
        if accepts is None:
            del request.headers["accept-encoding"]  # (httpx adds its own)
        assert http.send(request).status_code == 200
    assert upstream.requests[-1].header("accept-encoding") == "identity"


def test_upstream_unreachable_is_502(make_gateway) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    gw: Gateway = make_gateway(anthropic_upstream=dead)
    key = gw.issue_key("dead")
    resp = post(gw, key, json=BODY)
    assert resp.status_code == 502
    assert resp.json()["error"] == {"type": "api_error", "message": "the provider could not be reached"}
    rows = gw.wait_recorded("dead")
    assert rows[0]["outcome"] == "upstream_unreachable"


def test_disconnect_before_any_usage_bills_the_reservation(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(drain_timeout_seconds=0.3)
    key = gw.issue_key("early")
    upstream.enqueue(Reply.fixture("anthropic/stream_text.sse", hang_after=0))
    body = httpx.Request("POST", "http://x", json=STREAM_BODY).content
    with httpx.stream("POST", f"{gw.url}/anthropic/v1/messages", content=body, headers={"x-api-key": key}) as r:
        assert r.status_code == 200
    rows = gw.wait_recorded("early", timeout=10)
    assert rows[0]["outcome"] == "client_disconnected" and rows[0]["estimated"] == 1
    assert gw.events("early") == {"claude_input_tokens": len(body) // 2 + 16, "claude_output_tokens": 64}


def test_no_secret_in_logs_or_errors(make_gateway, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import ANTHROPIC_KEY, GEMINI_KEY

    caplog.set_level("DEBUG")
    # The JSON lines GATEWAY_LOG_FORMAT=json writes, formatted as they are logged (in the request's context).
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    gw: Gateway = make_gateway(anthropic_upstream=dead, upstream_timeout_seconds=0.5)
    key = gw.issue_key("sec")
    prompt = {**BODY, "messages": [{"role": "user", "content": PROMPT}]}
    try:
        unreachable = post(gw, key, json=prompt)
        bodies = [
            unreachable.text,  # unreachable provider
            post(gw, "pgw_wrong", json=prompt).text,  # bad key
            post(gw, key, path="/gemini/v1/models/m:generateContent?key=" + key, content=b"{bad").text,
        ]
        upstream.enqueue(Reply.fixture("gemini/generate_content.json", delay_before=30))
        bodies.append(
            post(gw, key, path="/gemini/v1/models/m:generateContent", json={}, headers={"x-goog-api-key": key}).text
        )
    finally:
        logging.getLogger().removeHandler(handler)
    server_logs = [r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    json_lines = [orjson.loads(line) for line in lines.getvalue().splitlines()]
    json_logs = [line for line in json_lines if not line["logger"].startswith(("httpx", "httpcore"))]
    text = "\n".join(server_logs) + "".join(bodies)  # (the test's own client logs its URLs)
    text += "\n".join(orjson.dumps(line).decode() for line in json_logs)
    for secret in (ANTHROPIC_KEY, GEMINI_KEY, key, PROMPT):
        assert secret not in text
    # The line about the failed request carries its id, the one its client got.
    (line,) = [line for line in json_logs if line["message"].startswith("upstream anthropic unreachable")]
    assert line["request_id"] == unreachable.headers["x-gateway-request-id"]
    assert line["level"] == "warning" and line["logger"] == "gateway.proxy"


def test_full_disk_refuses_with_503_before_forwarding_and_releases_the_reservation(
    make_gateway,  # type: ignore[no-untyped-def]
    upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    gw: Gateway = make_gateway(plan={"claude_output_tokens": 64})
    key = gw.issue_key("full")
    journal = gw.services.journal
    segment, directory = journal._current, journal.directory
    assert segment is not None and directory is not None
    # The current segment has no room left and no new one can be made (on a full disk the new
    # segment's fallocate fails; here its directory is a file): every journal line fails with OSError.
    journal.directory = tmp_path / "full"
    journal.directory.write_bytes(b"")
    segment.size = segment.capacity
    try:
        before = len(upstream.requests)
        c = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as err:
            c.messages.create(**BODY)  # type: ignore[arg-type]
        assert err.value.status_code == 503
        assert err.value.body["error"]["message"] == "the gateway cannot record usage right now"  # type: ignore[index]
        assert len(upstream.requests) == before  # never forwarded: nothing to bill
    finally:
        journal.directory = directory
    # the refused request held no quota: the whole allowance is still there
    c.messages.create(**BODY)  # type: ignore[arg-type]
    gw.wait_recorded("full", 1)


GEMINI_BODY = {"contents": [{"parts": [{"text": "Hi"}], "role": "user"}]}
# What Google answers to `fields=candidates` (a system parameter every Google API honours): no usageMetadata.
MASKED = {"candidates": [{"content": {"parts": [{"text": "Hello"}], "role": "model"}, "finishReason": "STOP"}]}


@pytest.mark.parametrize(
    "call",
    [
        "generateContent?fields=candidates",
        "generateContent?%24fields=candidates",
        "generateContent?callback=f",  # JSONP: the JSON wrapped in `f(...)`, which no meter reads
        "streamGenerateContent?alt=sse&$fields=candidates",
        "streamGenerateContent?$callback=f",
    ],
)
def test_a_response_field_mask_or_jsonp_is_refused_before_the_provider(
    gateway: Gateway, upstream: FakeUpstream, call: str
) -> None:
    # Google would leave `usageMetadata` out (or wrap the JSON): the answer carries no usage, billed 0.
    key = gateway.issue_key("mask")
    upstream.enqueue(Reply.json(MASKED))
    path = f"/gemini/v1beta/models/gemini-2.5-flash:{call}"
    resp = post(gateway, key, path=path, json=GEMINI_BODY, headers={"x-goog-api-key": key})
    name = call.split("?")[1].split("&")[-1].split("=")[0].replace("%24", "$")
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == {
        "code": 400,
        "message": f"{name}= is not served by the gateway on a metered call: the response must keep its usage",
        "status": "INVALID_ARGUMENT",
    }
    assert upstream.requests == [] and gateway.requests("mask") == []


def test_a_field_mask_header_is_not_forwarded(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("maskh")
    resp = post(
        gateway,
        key,
        path="/gemini/v1beta/models/gemini-2.5-flash:generateContent",
        json=GEMINI_BODY,
        headers={"x-goog-api-key": key, "x-goog-fieldmask": "candidates"},
    )
    assert resp.status_code == 200
    assert upstream.requests[-1].header("x-goog-fieldmask") is None  # the whole answer, usageMetadata included
    gateway.wait_recorded("maskh")
    assert gateway.events("maskh") == {"gemini_input_tokens": 8, "gemini_output_tokens": 294}


def test_a_compressed_request_body_is_refused_clearly(gateway: Gateway, upstream: FakeUpstream) -> None:
    # The gateway sizes the reservation from the body it reads: an encoded one it would misread (gzip:
    # "malformed JSON: not valid UTF-8"), or, JSON that claims an encoding, forward for the provider to decode.
    key = gateway.issue_key("enc")
    raw = orjson.dumps(BODY)
    message = "compressed request bodies (content-encoding) are not served by the gateway: send the JSON uncompressed"
    for content, encoding in ((gzip.compress(raw), "gzip"), (raw, "gzip"), (raw, "br")):
        resp = post(gateway, key, content=content, headers={"content-encoding": encoding})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"] == {"type": "invalid_request_error", "message": message}
    gemini = "/gemini/v1beta/models/gemini-2.5-flash:generateContent"
    headers = {"x-goog-api-key": key, "content-encoding": "gzip"}
    resp = post(gateway, key, path=gemini, content=orjson.dumps(GEMINI_BODY), headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["message"] == message
    assert upstream.requests == [] and gateway.requests("enc") == []
    assert post(gateway, key, content=raw, headers={"content-encoding": "identity"}).status_code == 200
