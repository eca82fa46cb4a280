"""Slow and numerous clients, over raw sockets against a served gateway: a request must arrive within
the client timeout (else 408 and close), connections past the cap get a 503, and a response that
takes longer than the client timeout to a client that reads is not cut."""

from __future__ import annotations

import gc
import json
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gateway.server import MAX_HEAD_BYTES, BoundedProtocol
from gateway.settings import ConfigError, settings_from_env
from tests.conftest import ADMIN_TOKEN, Gateway, GatewayProcess, fixture_bytes, wait_until
from tests.fakes.upstream import FakeUpstream, Reply

TIMEOUT = 1.0
MIB = 1024 * 1024
HEAD_MESSAGE = f"the request line and headers exceed {MAX_HEAD_BYTES} bytes"
MARGIN = 4.0  # a loaded two-core machine may run the timer late; the bug holds connections for ever
STREAM_BODY = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 64,
    "stream": True,
    "messages": [{"role": "user", "content": "Hi"}],
}


def _connect(gw: Gateway | GatewayProcess) -> socket.socket:
    host, port = gw.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_until_closed(socks: list[socket.socket], deadline: float) -> dict[socket.socket, bytes]:
    """Everything each socket receives until the gateway closes it; fails if one is open at `deadline`."""
    received = {s: b"" for s in socks}
    open_socks = set(socks)
    with selectors.DefaultSelector() as sel:
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        while open_socks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{len(open_socks)} of {len(socks)} connections still open")
            for key, _ in sel.select(remaining):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    received[s] += chunk
                else:
                    sel.unregister(s)
                    open_socks.discard(s)
    return received


def _status_and_json(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def _get(sock: socket.socket, path: str = "/healthz") -> bytes:
    """One keep-alive GET on a raw socket; the response is read up to its declared length."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        if not chunk:
            return raw
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    length = next(int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k == b"content-length")
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _protocols() -> int:
    gc.collect()
    return sum(isinstance(o, BoundedProtocol) for o in gc.get_objects())


def _no_connections(gw: Gateway) -> bool:
    state = gw.server.server.server_state
    return not state.connections and not state.tasks


@pytest.fixture
def slow_gateway(make_gateway: Callable[..., Gateway]) -> Gateway:
    return make_gateway(client_timeout_seconds=TIMEOUT)


def test_half_sent_headers_get_408_and_close(slow_gateway: Gateway) -> None:
    partial = [
        b"GET /healthz HT",
        b"POST /admin/keys HTTP/1.1\r\nhost: x\r\nauthoriz",
        b"POST /anthropic/v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: gk_",
    ]
    socks = [_connect(slow_gateway) for _ in range(200)]
    try:
        started = time.monotonic()
        for i, s in enumerate(socks):
            s.sendall(partial[i % len(partial)])
        received = _read_until_closed(socks, started + TIMEOUT + MARGIN)
        assert time.monotonic() - started >= TIMEOUT * 0.9
    finally:
        for s in socks:
            s.close()
    for raw in received.values():
        status, body = _status_and_json(raw)
        assert status == 408 and b"connection: close" in raw
        assert body["error"] == {
            "type": "request_timeout",
            "message": "the request did not arrive within the gateway's client timeout of 1 s",
        }
    wait_until(lambda: _no_connections(slow_gateway), timeout=10)
    with httpx.Client(base_url=slow_gateway.url) as client:
        assert client.get("/healthz").status_code == 200


def test_connection_that_sends_nothing_is_closed(slow_gateway: Gateway) -> None:
    with _connect(slow_gateway) as s:
        assert _read_until_closed([s], time.monotonic() + TIMEOUT + MARGIN) == {s: b""}


def test_later_request_on_a_kept_alive_connection_is_timed_too(slow_gateway: Gateway) -> None:
    with _connect(slow_gateway) as s:
        assert _get(s).startswith(b"HTTP/1.1 200 ")
        time.sleep(TIMEOUT * 1.5)  # idle past the client timeout (within uvicorn's keep-alive), as a client may
        assert _get(s).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost")
        raw = _read_until_closed([s], started + TIMEOUT + MARGIN)[s]
    assert _status_and_json(raw)[0] == 408


@pytest.mark.parametrize("route", ["provider", "admin"])
def test_body_shorter_than_its_length_gets_408(
    route: str, slow_gateway: Gateway, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    if route == "provider":
        key = slow_gateway.issue_key("slowbody")
        head = f"POST /anthropic/v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n"
    else:
        head = f"POST /admin/keys HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n"
    with _connect(slow_gateway) as s:
        started = time.monotonic()
        s.sendall(f"{head}content-type: application/json\r\ncontent-length: 1000\r\n\r\n".encode() + b'{"use')
        raw = _read_until_closed([s], started + TIMEOUT + MARGIN)[s]
        assert time.monotonic() - started >= TIMEOUT * 0.9
    status, body = _status_and_json(raw)
    assert status == 408
    assert body["error"] == {
        "type": "request_timeout",
        "message": "the request did not arrive within the gateway's client timeout of 1 s",
    }
    wait_until(lambda: _no_connections(slow_gateway), timeout=10)
    assert upstream.requests == [] and slow_gateway.requests("slowbody") == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # a slow client is not a server error


def test_body_sent_in_time_in_pieces_is_served(slow_gateway: Gateway) -> None:
    payload = json.dumps({"user_id": "pieces"}).encode()
    with _connect(slow_gateway) as s:
        s.sendall(
            f"POST /admin/keys HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n".encode()
            + f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
            + payload[:5]
        )
        time.sleep(TIMEOUT * 0.6)  # the client's pace under test, not synchronisation
        s.sendall(payload[5:])
        status, body = _status_and_json(_read_first_response(s))
    assert status == 201 and body["user_id"] == "pieces"


def _read_first_response(s: socket.socket) -> bytes:
    s.settimeout(10)
    raw = b""
    while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
        chunk = s.recv(65536)
        if not chunk:
            break
        raw += chunk
    return raw


def test_connections_past_the_cap_get_503_until_some_close(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(max_connections=4)
    wait_until(lambda: _no_connections(gw), timeout=10)
    held = [_connect(gw) for _ in range(4)]
    try:
        for s in held:  # each is accepted and served before the next opens
            assert _get(s).startswith(b"HTTP/1.1 200 ")
        for _ in range(3):
            with _connect(gw) as extra:
                extra.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                raw = _read_until_closed([extra], time.monotonic() + MARGIN)[extra]
            status, body = _status_and_json(raw)
            assert status == 503 and b"retry-after: 1" in raw and b"connection: close" in raw
            assert body["error"] == {"type": "overloaded_error", "message": "the gateway is at its connection limit"}
        assert _get(held[0]).startswith(b"HTTP/1.1 200 ")  # the accepted ones keep being served
    finally:
        for s in held:
            s.close()

    def served() -> bool:
        try:
            return httpx.get(f"{gw.url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(served, timeout=10)


def test_stream_longer_than_the_client_timeout_is_delivered_whole(
    slow_gateway: Gateway, upstream: FakeUpstream
) -> None:
    key = slow_gateway.issue_key("slowstream")
    upstream.enqueue(Reply.fixture("anthropic/stream_text.sse", delay_before=TIMEOUT * 1.2, delay_between=0.3))
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{slow_gateway.url}/anthropic/v1/messages",
        json=STREAM_BODY,
        headers={"x-api-key": key},
        timeout=30,
    ) as resp:
        assert resp.status_code == 200
        streamed = b"".join(resp.iter_raw())
    assert time.monotonic() - started > 2 * TIMEOUT
    assert streamed == fixture_bytes("anthropic/stream_text.sse")
    assert slow_gateway.wait_recorded("slowstream", timeout=10)[0]["outcome"] == "ok"


def test_no_protocol_outlives_its_connection(make_gateway: Callable[..., Gateway]) -> None:
    """Timers are cancelled when a request completes or its client leaves (the default timeout is long)."""
    gw = make_gateway()
    with httpx.Client(base_url=gw.url) as client:
        for _ in range(20):
            assert client.get("/healthz").status_code == 200
    for _ in range(20):
        with _connect(gw) as s:
            s.sendall(b"POST /admin/keys HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n{")
    for _ in range(20):
        with _connect(gw) as s:
            s.sendall(b"GET /heal")
    wait_until(lambda: _no_connections(gw), timeout=10)
    wait_until(lambda: _protocols() == 0, timeout=10, interval=0.1)


def test_gateway_serve_applies_both_bounds(tmp_path: Path) -> None:
    env = {
        "GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
        "GATEWAY_CLIENT_TIMEOUT_SECONDS": "1",
        "GATEWAY_MAX_CONNECTIONS": "2",
    }
    gw = GatewayProcess(env).start()
    try:
        with _connect(gw) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nho")
            assert _status_and_json(_read_until_closed([s], time.monotonic() + TIMEOUT + MARGIN)[s])[0] == 408
        held: list[socket.socket] = []

        def hold() -> bool:  # the health checks' connections may not be reaped yet
            s = _connect(gw)
            if _get(s).startswith(b"HTTP/1.1 200 "):
                held.append(s)
                return True
            s.close()
            return False

        wait_until(hold, timeout=10)
        wait_until(hold, timeout=10)
        with _connect(gw) as extra:
            assert _get(extra).startswith(b"HTTP/1.1 503 ")
        for s in held:
            s.close()
    finally:
        gw.stop()


@pytest.mark.parametrize(
    ("var", "value"),
    [("GATEWAY_CLIENT_TIMEOUT_SECONDS", v) for v in ("0", "-1", "nan", "inf")]
    + [("GATEWAY_MAX_CONNECTIONS", v) for v in ("0", "-1")],
)
def test_bounds_must_be_positive(var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{var} must"):
        settings_from_env({var: value}, load_file=False)


def test_blank_lines_after_a_response_do_not_hold_the_connection_for_ever(slow_gateway: Gateway) -> None:
    """A kept-alive connection whose client only trickles CRLF (which llhttp skips before a request
    line, so no request begins) must still be closed: by the client timeout or the keep-alive one."""
    limit = TIMEOUT + 5 + MARGIN  # the client timeout, or uvicorn's 5 s keep-alive, whichever applies
    with _connect(slow_gateway) as s:
        assert _get(s).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        s.settimeout(0.3)  # the client's pace: a blank line every 0.3 s, as a slowloris would
        closed = False
        while time.monotonic() - started < limit:
            try:
                s.sendall(b"\r\n")
                if s.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
    assert closed, f"connection still open {limit:.0f} s after its last response"
    wait_until(lambda: _no_connections(slow_gateway), timeout=10)


def test_refused_connections_do_not_count_against_the_accepted_ones(make_gateway: Callable[..., Gateway]) -> None:
    """Connections answered 503 linger up to a second; while they do, a freed slot must still be
    given to a new connection (else a stream of cheap connects keeps the gateway refusing all)."""
    gw = make_gateway(max_connections=2)
    state = gw.server.server.server_state
    wait_until(lambda: _no_connections(gw), timeout=10)
    held = [_connect(gw) for _ in range(2)]
    for s in held:
        assert _get(s).startswith(b"HTTP/1.1 200 ")
    refused = [_connect(gw) for _ in range(2)]  # over the cap; they send nothing (yet)
    try:
        wait_until(lambda: len(state.connections) == 4, timeout=5)
        for s in held:
            s.close()
        wait_until(lambda: len(state.connections) == 2, timeout=5)  # only the refused ones left
        with _connect(gw) as fresh:
            answer = _get(fresh)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:60]  # no accepted connection is open
    finally:
        for s in refused:
            s.close()


@pytest.mark.parametrize(
    "head",
    [
        b"POST /anthropic/v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n",
        b"POST /admin/keys HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        b"BREW /api/billing/status HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nbad header: 1\r\n\r\n",
    ],
    ids=["bad-length", "two-lengths", "unknown-method", "bad-header"],
)
def test_a_request_that_is_not_http_gets_a_json_400_and_close(slow_gateway: Gateway, head: bytes) -> None:
    # Before, the HTTP server's own plain-text "Invalid HTTP request received." (no error shape at all).
    with _connect(slow_gateway) as sock:
        sock.sendall(head)
        raw = _read_until_closed([sock], time.monotonic() + MARGIN)[sock]
    assert _status_and_json(raw) == (
        400,
        {"type": "error", "error": {"type": "invalid_request_error", "message": "the request is not valid HTTP/1.1"}},
    )
    assert b"content-type: application/json" in raw and b"connection: close" in raw


@pytest.mark.parametrize(
    "start", [b"GET /healthz?q=", b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: "], ids=["url", "header"]
)
def test_a_head_past_its_limit_gets_431_and_close(slow_gateway: Gateway, start: bytes) -> None:
    # The parser kept every byte of a request line or header until it ended: one client sending a
    # URL or header without end grew the process by what it sent within the client timeout (100+ MB).
    sent = 0
    with _connect(slow_gateway) as sock:
        sock.sendall(start)
        try:
            while sent < 64 * MIB:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = _read_until_closed([sock], time.monotonic() + MARGIN)[sock]
    assert sent < 16 * MIB  # what the kernel buffers on both sides took before the close reached the client
    assert _status_and_json(raw) == (
        431,
        {"type": "error", "error": {"type": "invalid_request_error", "message": HEAD_MESSAGE}},
    )


def test_heads_within_the_limit_and_bodies_of_any_size_pass(slow_gateway: Gateway) -> None:
    head = f"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {'a' * (MAX_HEAD_BYTES - 1024)}\r\n\r\n".encode()
    with _connect(slow_gateway) as sock:
        for i in range(0, len(head), 4096):  # in pieces, as a slow link delivers it
            sock.sendall(head[i : i + 4096])
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 ")
    with slow_gateway.admin() as admin:  # a body the size of many heads, sent with its head in one go
        # (the padding in a field the endpoint ignores: a key name itself is bounded)
        resp = admin.post("/admin/keys", json={"user_id": "alice", "name": "k", "padding": "a" * (MIB - 1024)})
    assert resp.status_code == 201
