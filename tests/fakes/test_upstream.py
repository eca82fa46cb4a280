"""Tests for the fake Anthropic + Gemini upstream (tests/fakes/upstream.py)."""

from __future__ import annotations

import gzip
import json
import socket
import time
import zlib
from collections.abc import Callable, Iterator

import anthropic
import httpx
import pytest
from google import genai
from google.genai import types

from tests.fakes.upstream import (
    FIXTURES_DIR,
    FakeUpstream,
    RecordedRequest,
    Reply,
    split_json_array_stream,
    split_sse_events,
)

GEN_PATH = "/v1/models/gemini-2.5-flash:generateContent"


def fixture_bytes(relpath: str) -> bytes:
    return (FIXTURES_DIR / relpath).read_bytes()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `predicate` until true or fail at the deadline (no fixed sleeps as synchronisation)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before deadline")
        time.sleep(0.005)


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as f:
        yield f


@pytest.fixture
def client(fake: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, trust_env=False, timeout=10.0) as c:
        yield c


def raw_chunks(url: str, request: bytes) -> tuple[bytes, list[bytes]]:
    """Send a raw HTTP/1.1 request; return (head, HTTP chunk payloads) of a chunked response."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while True:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    chunks: list[bytes] = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]
    return head, chunks


def post_request(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


# ---- splitting ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relpath", "n_events"),
    [
        ("anthropic/stream_text.sse", 8),
        ("gemini/stream_generate_content.sse", 3),
        ("gemini/image_stream.sse", 2),
        ("edge/anthropic_stream_crlf.sse", 8),
        ("edge/gemini_stream_lf.sse", 3),
    ],
)
def test_split_sse_events_keeps_exact_bytes(relpath: str, n_events: int) -> None:
    data = fixture_bytes(relpath)
    events = split_sse_events(data)
    assert b"".join(events) == data
    assert len(events) == n_events
    for ev in events:
        assert ev.endswith((b"\n\n", b"\r\n\r\n"))


def test_split_sse_events_mixed_and_unterminated() -> None:
    data = b"event: a\ndata: 1\n\nevent: b\r\ndata: 2\r\n\r\n\ndata: 3\r\rdata: tail"
    assert split_sse_events(data) == [
        b"event: a\ndata: 1\n\n",
        b"event: b\r\ndata: 2\r\n\r\n",
        b"\ndata: 3\r\r",
        b"data: tail",
    ]


def test_split_json_array_stream() -> None:
    data = fixture_bytes("gemini/stream_generate_content_array.json")
    pieces = split_json_array_stream(data)
    assert b"".join(pieces) == data
    assert len(pieces) == 3
    assert pieces[0].startswith(b"[{")
    assert all(p.startswith(b",\r\n{") for p in pieces[1:])
    assert pieces[-1].endswith(b"}]")


# ---- default routing: exact fixture bytes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "relpath"),
    [
        ("POST", "/v1/messages", b'{"max_tokens":64,"model":"claude-sonnet-4-6"}', "anthropic/message.json"),
        ("POST", "/v1/messages", b'{"stream":false}', "anthropic/message.json"),
        ("POST", "/v1/messages/count_tokens", b'{"messages":[]}', "anthropic/count_tokens.json"),
        ("POST", GEN_PATH, b"{}", "gemini/generate_content.json"),
        ("POST", "/v1beta/models/gemini-2.5-flash:generateContent", b"{}", "gemini/generate_content.json"),
        ("POST", "/v1alpha/tunedModels/my-tuned:generateContent", b"{}", "gemini/generate_content.json"),
        (
            "POST",
            "/v1/models/gemini-2.5-flash-image:generateContent",
            b"{}",
            "gemini/image_generate_content.json",
        ),
        ("POST", "/v1/models/gemini-2.5-flash:countTokens", b"{}", "gemini/count_tokens.json"),
        ("POST", "/v1beta/models/imagen-4.0-generate-001:predict", b"{}", "gemini/imagen_predict.json"),
    ],
)
def test_default_json_routes_return_fixture_bytes(
    client: httpx.Client, method: str, path: str, body: bytes, relpath: str
) -> None:
    r = client.request(method, path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert r.content == fixture_bytes(relpath)
    assert r.headers["content-type"] == "application/json"
    assert r.headers["content-length"] == str(len(r.content))
    if relpath.startswith("anthropic/"):
        assert r.headers["request-id"].startswith("req_")
    else:
        assert "request-id" not in r.headers


@pytest.mark.parametrize(
    ("path", "body", "relpath"),
    [
        ("/v1/messages", b'{"model":"claude-sonnet-4-6","stream":true}', "anthropic/stream_text.sse"),
        (
            "/v1/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            b"{}",
            "gemini/stream_generate_content.sse",
        ),
        (
            "/v1beta/models/gemini-2.5-flash-image:streamGenerateContent?alt=sse",
            b"{}",
            "gemini/image_stream.sse",
        ),
    ],
)
def test_default_sse_routes_stream_one_event_per_chunk(
    client: httpx.Client, path: str, body: bytes, relpath: str
) -> None:
    expected = fixture_bytes(relpath)
    events = split_sse_events(expected)
    with client.stream("POST", path, content=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in r.headers
        received = list(r.iter_raw())
    assert received[0] == events[0]
    assert b"".join(received) == expected


def test_sse_http_chunks_are_exactly_the_events(fake: FakeUpstream) -> None:
    """On the wire every HTTP chunk is exactly one SSE event (one write per event)."""
    expected = fixture_bytes("gemini/stream_generate_content.sse")
    head, chunks = raw_chunks(
        fake.url, post_request("/v1/models/gemini-2.5-flash:streamGenerateContent?alt=sse", b"{}")
    )
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nTransfer-Encoding: chunked" in head
    assert b"Content-Length" not in head
    assert chunks == split_sse_events(expected)
    assert chunks[0].endswith(b"\r\n\r\n")

    head, chunks = raw_chunks(fake.url, post_request("/v1/messages", b'{"stream":true}'))
    assert chunks == split_sse_events(fixture_bytes("anthropic/stream_text.sse"))
    assert chunks[0].startswith(b"event: message_start\n")


def test_gemini_array_stream_in_pieces(fake: FakeUpstream) -> None:
    expected = fixture_bytes("gemini/stream_generate_content_array.json")
    head, chunks = raw_chunks(fake.url, post_request("/v1/models/gemini-2.5-flash:streamGenerateContent", b"{}"))
    assert b"Content-Type: application/json" in head.replace(b"content-type", b"Content-Type")
    assert chunks == split_json_array_stream(expected)
    assert len(chunks) == 3
    assert json.loads(b"".join(chunks))[-1]["usageMetadata"]["totalTokenCount"] == 304


def test_anthropic_models(client: httpx.Client) -> None:
    r = client.get("/v1/models", headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 200
    assert r.json() == {
        "data": [
            {
                "type": "model",
                "id": "claude-sonnet-4-6",
                "display_name": "Claude Sonnet 4.6",
                "created_at": "2025-09-29T00:00:00Z",
            }
        ],
        "has_more": False,
        "first_id": "claude-sonnet-4-6",
        "last_id": "claude-sonnet-4-6",
    }
    assert r.headers["request-id"].startswith("req_")
    r = client.get("/v1/models/claude-sonnet-4-6")
    assert r.json()["display_name"] == "Claude Sonnet 4.6"

    r = client.get("/v1/models/claude-nope", headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 404
    err = r.json()
    assert err["type"] == "error"
    assert err["error"]["type"] == "not_found_error"
    assert err["request_id"] == r.headers["request-id"]
    assert err["request_id"].startswith("req_")


def test_gemini_models(client: httpx.Client) -> None:
    r = client.get("/v1/models", headers={"x-goog-api-key": "k"})
    names = [m["name"] for m in r.json()["models"]]
    assert "models/gemini-2.5-flash" in names
    r = client.get("/v1beta/models")
    assert "models" in r.json()
    r = client.get("/v1/models/gemini-2.5-flash")
    assert r.json()["supportedGenerationMethods"][0] == "generateContent"
    r = client.get("/v1beta/models/gemini-nope")
    assert r.status_code == 404
    assert r.json()["error"]["status"] == "NOT_FOUND"
    assert r.json()["error"]["code"] == 404


def test_unknown_routes_404(client: httpx.Client) -> None:
    shape = set(json.loads(fixture_bytes("gemini/error_404_not_found.json"))["error"])
    r = client.post("/v1/models/gemini-2.5-flash:embedNothing", content=b"{}")
    assert r.status_code == 404
    assert set(r.json()["error"]) == shape
    assert r.json()["error"]["status"] == "NOT_FOUND"

    r = client.get("/nope")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "not_found_error"

    r = client.get("/v1/messages")
    assert r.status_code == 404
    assert r.json()["type"] == "error"


# ---- enqueue / reset / recording ----------------------------------------------------------------------


def test_enqueue_overrides_fifo_then_default(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.enqueue(
        Reply.fixture("anthropic/error_429_rate_limit.json", headers=[("retry-after", "1")]),
        Reply.json({"hello": "world"}, status=201),
    )
    r1 = client.post("/v1/messages", content=b"{}")
    assert r1.status_code == 429
    assert r1.content == fixture_bytes("anthropic/error_429_rate_limit.json")
    assert r1.headers["retry-after"] == "1"
    assert r1.headers["request-id"].startswith("req_")
    r2 = client.post(GEN_PATH, content=b"{}")
    assert r2.status_code == 201
    assert r2.content == b'{"hello":"world"}'
    assert r2.headers["content-type"] == "application/json"
    r3 = client.post("/v1/messages", content=b"{}")
    assert r3.content == fixture_bytes("anthropic/message.json")


def test_fixture_status_and_header_overrides(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.enqueue(
        Reply.fixture("gemini/error_503_unavailable.json"),
        Reply.fixture("anthropic/error_529_overloaded.json", status=200, headers=[("request-id", "req_mine")]),
        Reply.fixture("anthropic/stream_text.sse", stream=False),
    )
    assert client.post(GEN_PATH, content=b"{}").status_code == 503
    r = client.post("/v1/messages", content=b"{}")
    assert r.status_code == 200
    assert r.headers.get_list("request-id") == ["req_mine"]
    r = client.post("/v1/messages", content=b"{}")
    assert r.headers["content-length"] == str(len(fixture_bytes("anthropic/stream_text.sse")))
    assert r.headers["content-type"] == "text/event-stream"


def test_reset_clears_queue_and_requests(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.enqueue(Reply(status=500))
    client.get("/x")
    fake.enqueue(Reply(status=500))
    fake.reset()
    assert fake.requests == []
    assert client.post("/v1/messages", content=b"{}").status_code == 200
    assert len(fake.wait_for_requests(1)) == 1


def test_requests_recorded_exactly(fake: FakeUpstream, client: httpx.Client) -> None:
    body = b'{"contents": [{"parts": [{"text": "Hello"}], "role": "user"}]}'
    client.post(
        GEN_PATH + "?key=AIzaX&alt=json",
        content=body,
        headers=[("X-Goog-Api-Key", "AIzaTEST"), ("x-custom", "one"), ("x-custom", "two")],
    )
    gz = gzip.compress(b'{"a":1}')
    client.post("/v1/messages", content=gz, headers={"content-encoding": "gzip"})
    reqs = fake.wait_for_requests(2)
    req = reqs[0]
    assert isinstance(req, RecordedRequest)
    assert req.method == "POST"
    assert req.path == GEN_PATH
    assert req.query == "key=AIzaX&alt=json"
    assert req.body == body
    assert req.json()["contents"][0]["role"] == "user"
    assert req.header("x-goog-api-key") == "AIzaTEST"
    assert req.header("X-CUSTOM") == "one"
    assert ("X-Goog-Api-Key", "AIzaTEST") in req.headers
    assert [v for k, v in req.headers if k == "x-custom"] == ["one", "two"]
    assert req.header("content-length") == str(len(body))
    assert req.header("missing") is None
    # Compressed request bodies are recorded as received, not decoded.
    assert reqs[1].body == gz
    assert reqs[1].header("content-encoding") == "gzip"


def test_wait_for_requests_times_out(fake: FakeUpstream) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        fake.wait_for_requests(1, timeout=0.2)
    assert time.monotonic() - t0 < 2


# ---- reply options --------------------------------------------------------------------------------------


def test_repeated_headers_preserved(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.enqueue(Reply(headers=[("set-cookie", "a=1"), ("Set-Cookie", "b=2"), ("x-n", "1")], body=b"ok"))
    r = client.get("/x")
    assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert r.content == b"ok"


def test_gzip_body(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.enqueue(Reply.fixture("anthropic/message.json", gzip=True), Reply.fixture("anthropic/message.json", gzip=True))
    r = client.post("/v1/messages", content=b"{}")
    assert r.headers["content-encoding"] == "gzip"
    assert r.content == fixture_bytes("anthropic/message.json")  # httpx decodes
    with client.stream("POST", "/v1/messages", content=b"{}") as r:
        raw = b"".join(r.iter_raw())
    assert raw != fixture_bytes("anthropic/message.json")
    assert gzip.decompress(raw) == fixture_bytes("anthropic/message.json")
    assert int(r.headers["content-length"]) == len(raw)


def test_gzip_chunked_stream_each_chunk_decodable(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.enqueue(Reply.fixture("anthropic/stream_text.sse", gzip=True))
    events = split_sse_events(fixture_bytes("anthropic/stream_text.sse"))
    with client.stream("POST", "/v1/messages", content=b"{}") as r:
        assert r.headers["content-encoding"] == "gzip"
        d = zlib.decompressobj(wbits=31)
        it = r.iter_raw()
        first = d.decompress(next(it))
        assert first == events[0]
        rest = b"".join(it)
    assert first + d.decompress(rest) == b"".join(events)


def test_drop_after_truncates(fake: FakeUpstream, client: httpx.Client) -> None:
    events = split_sse_events(fixture_bytes("anthropic/stream_text.sse"))
    fake.enqueue(Reply.fixture("anthropic/stream_text.sse", drop_after=3))
    got: list[bytes] = []
    with pytest.raises(httpx.RemoteProtocolError), client.stream("POST", "/v1/messages", content=b"{}") as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            got.append(chunk)
    assert b"".join(got) == b"".join(events[:3])
    wait_until(lambda: fake.active_connections == 0)


def test_drop_after_zero_body_reply(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.enqueue(Reply.json({"x": 1}, drop_after=0))
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/x")


def test_hang_after_read_timeout_then_connection_released(fake: FakeUpstream) -> None:
    events = split_sse_events(fixture_bytes("anthropic/stream_text.sse"))
    fake.enqueue(Reply.fixture("anthropic/stream_text.sse", hang_after=2))
    got: list[bytes] = []
    timeout = httpx.Timeout(5.0, read=0.3)
    with httpx.Client(base_url=fake.url, trust_env=False, timeout=timeout) as c:
        with pytest.raises(httpx.ReadTimeout), c.stream("POST", "/v1/messages", content=b"{}") as r:
            for chunk in r.iter_raw():
                got.append(chunk)
                if len(got) == 2:
                    assert fake.active_connections == 1
                    assert fake.active_requests == 1
        assert b"".join(got) == b"".join(events[:2])
    # The client gave up and closed: the fake sees the connection (and its hung handler) go away.
    wait_until(lambda: fake.active_connections == 0 and fake.active_requests == 0)


def test_hang_then_stop_returns_promptly() -> None:
    fake = FakeUpstream()
    fake.start()
    try:
        fake.enqueue(Reply.fixture("gemini/stream_generate_content.sse", hang_after=1))
        with httpx.Client(base_url=fake.url, trust_env=False, timeout=30.0) as c:
            with c.stream("POST", "/v1/models/m:streamGenerateContent?alt=sse", content=b"{}") as r:
                it = r.iter_raw()
                assert next(it).startswith(b"data: ")
                assert fake.active_connections == 1
                t0 = time.monotonic()
                fake.stop()
                assert time.monotonic() - t0 < 3
                with pytest.raises(httpx.RemoteProtocolError):
                    list(it)
    finally:
        fake.stop()
    assert fake.active_connections == 0


def test_delay_before_hang_then_stop_returns_promptly() -> None:
    fake = FakeUpstream()
    fake.start()
    sock = socket.create_connection(("127.0.0.1", int(fake.url.rsplit(":", 1)[1])), timeout=10)
    try:
        fake.enqueue(Reply(delay_before=3600))
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        fake.wait_for_requests(1)
        t0 = time.monotonic()
        fake.stop()
        assert time.monotonic() - t0 < 3
        assert sock.recv(100) == b""  # closed without any response bytes
    finally:
        sock.close()
        fake.stop()


def test_delay_between_still_streams_everything(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.enqueue(Reply(chunks=[b"a", b"b", b"c"], delay_between=0.01, delay_before=0.01))
    with client.stream("GET", "/x") as r:
        assert b"".join(r.iter_raw()) == b"abc"


def test_start_stop_lifecycle() -> None:
    fake = FakeUpstream()
    assert fake.active_connections == 0
    fake.start()
    assert fake.url.startswith("http://127.0.0.1:")
    with pytest.raises(RuntimeError):
        fake.start()
    # start() returned, so the server accepts connections right away.
    with socket.create_connection(("127.0.0.1", int(fake.url.rsplit(":", 1)[1])), timeout=2):
        pass
    fake.stop()
    fake.stop()  # idempotent
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(fake.url.rsplit(":", 1)[1])), 2):
        pass


# ---- the real SDKs against the fake ---------------------------------------------------------------------


def test_official_sdks_accept_the_fake(fake: FakeUpstream) -> None:
    ac = anthropic.Anthropic(base_url=fake.url, api_key="sk-test", max_retries=0)
    msg = ac.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=[{"role": "user", "content": "Hello"}])
    assert msg.usage.input_tokens == 12
    assert msg.usage.output_tokens == 9
    assert msg.content[0].type == "text"

    with ac.messages.stream(
        model="claude-sonnet-4-6", max_tokens=64, messages=[{"role": "user", "content": "Hello"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello! How can I help?"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (25, 15)

    gc = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=fake.url))
    resp = gc.models.generate_content(model="gemini-2.5-flash", contents="Hello")
    assert resp.text
    assert resp.usage_metadata is not None
    assert resp.usage_metadata.prompt_token_count is not None

    chunks = list(gc.models.generate_content_stream(model="gemini-2.5-flash", contents="Hello"))
    assert len(chunks) == 3
    assert "".join(c.text or "" for c in chunks) == "The quick brown fox jumps over the lazy dog."
    last = chunks[-1].usage_metadata
    assert last is not None
    assert (last.candidates_token_count, last.total_token_count) == (10, 304)

    reqs = fake.wait_for_requests(4)
    assert [(r.method, r.path, r.query) for r in reqs] == [
        ("POST", "/v1/messages", ""),
        ("POST", "/v1/messages", ""),
        ("POST", "/v1/models/gemini-2.5-flash:generateContent", ""),
        ("POST", "/v1/models/gemini-2.5-flash:streamGenerateContent", "alt=sse"),
    ]
    assert reqs[0].header("authorization") == "Bearer sk-test" or reqs[0].header("x-api-key") == "sk-test"
    assert reqs[1].json()["stream"] is True
    assert reqs[2].header("x-goog-api-key") == "k"
    assert reqs[2].json()["contents"][0]["parts"][0]["text"] == "Hello"
