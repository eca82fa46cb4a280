"""The HTTP server: uvicorn (uvloop, httptools) with slow clients, request heads and the connection
count bounded.

uvicorn bounds neither how long a client may take to send a request nor how many connections it
holds (`limit_concurrency` is checked per request, only once headers are complete, and counts the
over-limit connections against the accepted ones), nor, with httptools, how long a request line or
header may grow. `BoundedProtocol` adds these, per connection: a deadline for each request until it
has fully arrived, so responses (streams included) are never timed, and a size for its head; no
work is done per byte.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from enum import StrEnum
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.settings import Settings

log = logging.getLogger("gateway.server")

# An over-limit connection may take this long to send its request, so that it reads its 503 rather
# than a reset; a client sending nothing holds a descriptor no longer.
REJECT_GRACE_SECONDS = 1.0
FD_RESERVE = 256  # descriptors beyond two per connection (client + upstream): store, journal, logs
# A request line and headers longer than this get a 431: the parser keeps them whole until they end.
MAX_HEAD_BYTES = 64 * 1024


def _error_body(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def _raw_response(status: int, reason: str, body: bytes, extra: bytes = b"") -> bytes:
    """A whole response written straight to the transport, for when no request reached the app."""
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
    ).encode()
    return head + extra + b"\r\n" + body


def _timeout_response(seconds: float) -> bytes:
    message = f"the request did not arrive within the gateway's client timeout of {seconds:g} s"
    return _raw_response(408, "Request Timeout", _error_body("request_timeout", message))


# What the HTTP parser cannot read (a bad content-length, an unknown method, a malformed header)
# never reaches a route: answered here, in the shape of the 408 beside it, instead of uvicorn's plain text.
_NOT_HTTP = _raw_response(400, "Bad Request", _error_body("invalid_request_error", "the request is not valid HTTP/1.1"))

_HEAD_TOO_LARGE = _raw_response(
    431,
    "Request Header Fields Too Large",
    _error_body("invalid_request_error", f"the request line and headers exceed {MAX_HEAD_BYTES} bytes"),
)

_OVER_CAPACITY = _error_body("overloaded_error", "the gateway is at its connection limit")
_OVER_CAPACITY_RAW = _raw_response(503, "Service Unavailable", _OVER_CAPACITY, b"retry-after: 1\r\n")


async def _over_capacity(scope: Any, receive: Any, send: Any) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_OVER_CAPACITY)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": _OVER_CAPACITY, "more_body": False})


class Phase(StrEnum):
    """Where a connection's current request is: what the deadline bounds."""

    DUE = "due"  # a new connection: its first request has not begun
    HEADERS = "headers"
    BODY = "body"
    DONE = "done"  # fully received (being answered, or idle between requests): not timed


# The phases every request passes, as globals: a member looked up on its Enum class costs several
# times a global's lookup on Python 3.11.
_DUE, _HEADERS, _BODY, _DONE = Phase.DUE, Phase.HEADERS, Phase.BODY, Phase.DONE


class BoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for receiving each request, and a connection cap.

    A request's headers must arrive within `client_timeout` of its first byte (of the connection
    opening, for the first request), and its body within `client_timeout` of the headers. On expiry
    a client mid-request gets a 408 and the connection closes; one that sent nothing is closed.
    Connections past `max_connections` are answered 503 and closed.
    """

    client_timeout: float = 30.0
    max_connections: int = 4096

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One timer per connection, re-armed only when it fires early: a request costs two clock reads.
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._phase = Phase.DUE
        self._rejected = False
        # Of the current request's head, from the reads that ended inside it; -1 once a head has ended
        # (the read it ended in may also hold a body and the start of a pipelined request: not counted).
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        wait = self.client_timeout
        state = self.server_state
        refused = getattr(state, "gateway_refused", 0)  # refused connections still open
        if len(self.connections) - refused > self.max_connections:  # the set includes this connection
            self._rejected = True
            state.gateway_refused = refused + 1  # type: ignore[attr-defined]
            self.app = _over_capacity
            wait = min(wait, REJECT_GRACE_SECONDS)
        # The first request is due now: its budget starts with the connection.
        self._arm(self.loop.time() + wait)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._rejected:
            self._rejected = False  # (counted down once)
            self.server_state.gateway_refused -= 1  # type: ignore[attr-defined]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._phase
        super().data_received(data)  # (cancels uvicorn's keep-alive timer, re-armed only by a response)
        if (self._phase is _HEADERS or self._phase is _DUE) and before is not _BODY:
            # Counted per read, not per byte; at most one read short, never over.
            if self._head_bytes < 0:
                self._head_bytes = 0
            else:
                self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                cycle = self.cycle
                if cycle is None or cycle.response_complete:  # (never inside an earlier response)
                    self.transport.write(_HEAD_TOO_LARGE)
                self.transport.close()
            return
        if self._phase is _DONE and (cycle := self.cycle) is not None and cycle.response_complete:
            # Bytes that began no request (the blank lines llhttp skips before a request line): the
            # next request's headers are due from now, or the connection would be held untimed.
            if not self.transport.is_closing():
                self._phase = _HEADERS
                self._deadline = self.loop.time() + self.client_timeout
                if self._timer is None:
                    self._arm(self._deadline)

    def send_400_response(self, msg: str) -> None:
        self.transport.write(_NOT_HTTP)
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase is _DONE:
            self._deadline = self.loop.time() + self.client_timeout
            if self._timer is None:
                self._arm(self._deadline)
        self._phase = _HEADERS

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._head_bytes = -1
        self._deadline = self.loop.time() + self.client_timeout  # the body gets its own budget
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = _DONE
        super().on_message_complete()

    def _arm(self, when: float) -> None:
        self._deadline = when
        self._timer = self.loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer = None
        transport = self.transport
        if self._phase is Phase.DONE or transport.is_closing():
            return  # idle or answering: the next request arms a new timer
        now = self.loop.time()
        if now < self._deadline:
            return self._arm(self._deadline)
        if self.flow.read_paused:  # the gateway stopped reading (pipelining, an unread body): not the client's delay
            return self._arm(now + self.client_timeout)
        cycle = self.cycle
        if self._rejected and (cycle is None or not cycle.response_started):
            transport.write(_OVER_CAPACITY_RAW)
        elif self._phase is Phase.BODY:
            if not cycle.response_started:  # the app waits on the body: it reads a disconnect, sends nothing
                cycle.disconnected = True
                cycle.message_event.set()
                transport.write(_timeout_response(self.client_timeout))
        elif self._phase is Phase.HEADERS and (cycle is None or cycle.response_complete):
            # (not while an earlier request's response is under way: a 408 must not land inside it)
            transport.write(_timeout_response(self.client_timeout))
        transport.close()


def protocol_class(settings: Settings) -> type[BoundedProtocol]:
    return type(
        "GatewayProtocol",
        (BoundedProtocol,),
        {"client_timeout": settings.client_timeout_seconds, "max_connections": settings.max_connections},
    )


_worker_protocol: type[BoundedProtocol] | None = None


def __getattr__(name: str) -> Any:
    """`WorkerProtocol`: the protocol class of a spawned worker, by import string (a class made at
    run time cannot be pickled to it), sized from the settings in the worker's environment."""
    global _worker_protocol
    if name != "WorkerProtocol":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _worker_protocol is None:
        from gateway.settings import settings_from_env

        _worker_protocol = protocol_class(settings_from_env(load_file=False))
    return _worker_protocol


def server_config(
    app: Any, settings: Settings, host: str | None = None, port: int | None = None, *, workers: int = 1
) -> uvicorn.Config:
    """The uvicorn configuration `gateway serve` runs (and the tests serve the app with). With
    `workers` > 1, `app` is the import string of a factory each spawned worker calls."""
    return uvicorn.Config(
        app,
        host=host or settings.host,
        port=settings.port if port is None else port,
        workers=workers,
        factory=workers > 1,
        loop="uvloop",
        http="gateway.server:WorkerProtocol" if workers > 1 else protocol_class(settings),
        ws="none",  # no WebSocket routes: an upgrade must not hand the connection to another protocol
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # the gateway reads no client address; skip the per-request middleware
        log_config=None,
        timeout_graceful_shutdown=30,
    )


def ensure_fd_headroom(max_connections: int) -> None:
    """Raise the soft descriptor limit toward what `max_connections` needs, so the cap (a 503) is
    reached before accept() fails; warn when the hard limit is too low for that."""
    need = 2 * max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
        if soft < need:
            log.warning(
                "open file limit %d is below the %d that GATEWAY_MAX_CONNECTIONS=%d needs; lower it or raise the limit",
                soft,
                need,
                max_connections,
            )
