"""A fake Anthropic + Gemini API server speaking the real wire format over loopback HTTP.

`FakeUpstream` runs an aiohttp server in a background daemon thread with its own event loop. Tests (and
the official SDKs, through the gateway) talk to it over real HTTP. It records every request verbatim and
answers either from a FIFO of queued `Reply` objects or, when the queue is empty, by default routing to the
recorded fixtures in `tests/fixtures/` (byte-for-byte; streams are written one event per write, like the
providers do).

Usage::

    with FakeUpstream() as fake:
        fake.enqueue(Reply.fixture("anthropic/error_429_rate_limit.json", headers=[("retry-after", "1")]))
        ...  # point the gateway at fake.url
        req = fake.wait_for_requests(1)[0]
"""

from __future__ import annotations

import asyncio
import gzip as gzip_module
import json as json_module
import re
import secrets
import socket
import string
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

FIXTURES_DIR = Path(__file__).resolve().parent.parent / "fixtures"

_MAX_REQUEST_BODY = 256 * 1024 * 1024
_SHUTDOWN_TIMEOUT = 2.0
_ID_ALPHABET = string.ascii_letters + string.digits


# --------------------------------------------------------------------------------------------------------
# Recorded requests and canned replies
# --------------------------------------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One request exactly as received: raw path (no query), raw query string, ordered headers, raw body."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first header with this name (case-insensitive), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def json(self) -> Any:
        return json_module.loads(self.body)


@dataclass
class Reply:
    """A canned response. `chunks` (when not None) is streamed with chunked transfer, one write per chunk."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    chunks: list[bytes] | None = None
    delay_before: float = 0.0
    delay_between: float = 0.0
    hang_after: int | None = None
    drop_after: int | None = None
    gzip: bool = False

    @classmethod
    def fixture(cls, relpath: str, **kw: Any) -> Reply:
        """A reply serving `tests/fixtures/<relpath>` byte-for-byte.

        - `.sse`: `text/event-stream`, split into one chunk per SSE event (exact bytes, LF or CRLF framing).
          Pass `stream=False` to send it as one plain body instead.
        - `.json`: `application/json` body. With `stream=True` a JSON-array fixture (Gemini's non-SSE
          streamGenerateContent) is streamed in its `,\\r\\n`-separated pieces.
        - `.jsonl`: `application/octet-stream` body.
        - `anthropic/...` fixtures also get a `request-id: req_...` header, like every Anthropic response.
        - `error_<status>_...` fixtures default to that HTTP status (override with `status=`).

        Any other keyword goes to `Reply(...)`; `headers=` are appended after the defaults, and a
        content-type or request-id given there replaces the default one.
        """
        stream: bool | None = kw.pop("stream", None)
        data = (FIXTURES_DIR / relpath).read_bytes()
        name = Path(relpath).name
        if "status" not in kw:
            m = re.match(r"error_(\d{3})_", name)
            if m:
                kw["status"] = int(m.group(1))
        chunks: list[bytes] | None = None
        if name.endswith(".sse"):
            content_type = "text/event-stream"
            if stream is None or stream:
                chunks = split_sse_events(data)
        elif name.endswith(".json"):
            content_type = "application/json"
            if stream:
                chunks = split_json_array_stream(data)
        else:
            content_type = "application/octet-stream"
            if stream:
                chunks = [data]
        defaults = [("content-type", content_type)]
        if relpath.replace("\\", "/").startswith("anthropic/"):
            defaults.append(("request-id", new_request_id()))
        kw["headers"] = _merge_headers(defaults, kw.get("headers", []))
        if chunks is not None:
            return cls(chunks=chunks, **kw)
        return cls(body=data, **kw)

    @classmethod
    def cut(cls, data: bytes, at: int, stall: bool = False) -> Reply:
        """An SSE stream of `data[:at]` in one write, then the connection closed (or, `stall`, left silent)."""
        headers = [("content-type", "text/event-stream")]
        if stall:
            return cls(headers=headers, chunks=[data[:at], b""], hang_after=1)
        return cls(headers=headers, chunks=[data[:at], b""], drop_after=1)

    @classmethod
    def json(cls, obj: Any, status: int = 200, **kw: Any) -> Reply:
        """A compact JSON body with `content-type: application/json` (extra `headers=` are appended)."""
        body = json_module.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        kw["headers"] = _merge_headers([("content-type", "application/json")], kw.get("headers", []))
        return cls(status=status, body=body, **kw)


def new_request_id() -> str:
    """An Anthropic-style request id: `req_` + 24 base62 characters."""
    return "req_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def _merge_headers(defaults: list[tuple[str, str]], extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    given = {k.lower() for k, _ in extra}
    return [(k, v) for k, v in defaults if k.lower() not in given] + list(extra)


def split_sse_events(data: bytes) -> list[bytes]:
    """Split an SSE byte stream into events, each keeping its exact bytes including the blank-line terminator.

    Lines end in CRLF, LF or CR. An empty line ends the current event (if it has any content); bytes after
    the last terminator become a final chunk. Joining the result gives back `data` exactly.
    """
    events: list[bytes] = []
    start = 0
    pos = 0
    has_content = False
    n = len(data)
    while pos < n:
        cr = data.find(b"\r", pos)
        lf = data.find(b"\n", pos)
        if cr < 0 and lf < 0:
            break
        if cr < 0 or (0 <= lf < cr):
            eol, after = lf, lf + 1
        else:
            eol = cr
            after = cr + 2 if data[cr + 1 : cr + 2] == b"\n" else cr + 1
        if eol == pos:  # empty line
            if has_content:
                events.append(data[start:after])
                start = after
                has_content = False
        else:
            has_content = True
        pos = after
    if start < n:
        events.append(data[start:])
    return events


def split_json_array_stream(data: bytes) -> list[bytes]:
    """Split a streamed JSON array (`[{..}` `,\\r\\n{..}` ... `]`) before each `,\\r\\n` separator.

    Raw CR/LF cannot occur inside JSON strings, so every `,\\r\\n` is a top-level element separator.
    """
    pieces: list[bytes] = []
    start = 0
    while True:
        i = data.find(b",\r\n", start + 1)
        if i < 0:
            break
        pieces.append(data[start:i])
        start = i
    pieces.append(data[start:])
    return [p for p in pieces if p]


# --------------------------------------------------------------------------------------------------------
# Default routing
# --------------------------------------------------------------------------------------------------------

ANTHROPIC_MODEL: dict[str, Any] = {
    "type": "model",
    "id": "claude-sonnet-4-6",
    "display_name": "Claude Sonnet 4.6",
    "created_at": "2025-09-29T00:00:00Z",
}

GEMINI_MODELS: list[dict[str, Any]] = [
    {
        "name": "models/gemini-2.5-flash",
        "version": "001",
        "displayName": "Gemini 2.5 Flash",
        "description": "Stable version of Gemini 2.5 Flash, our mid-size multimodal model that supports "
        "up to 1 million tokens, released in June of 2025.",
        "inputTokenLimit": 1048576,
        "outputTokenLimit": 65536,
        "supportedGenerationMethods": [
            "generateContent",
            "countTokens",
            "createCachedContent",
            "batchGenerateContent",
        ],
        "temperature": 1,
        "topP": 0.95,
        "topK": 64,
        "maxTemperature": 2,
        "thinking": True,
    },
    {
        "name": "models/gemini-2.5-flash-image",
        "version": "2.0",
        "displayName": "Nano Banana",
        "description": "Gemini 2.5 Flash Image",
        "inputTokenLimit": 32768,
        "outputTokenLimit": 32768,
        "supportedGenerationMethods": ["generateContent", "countTokens", "batchGenerateContent"],
        "temperature": 1,
        "topP": 0.95,
        "topK": 64,
        "maxTemperature": 2,
    },
    {
        "name": "models/imagen-4.0-generate-001",
        "version": "001",
        "displayName": "Imagen 4",
        "description": "Vertex served Imagen 4.0 model",
        "inputTokenLimit": 480,
        "outputTokenLimit": 8192,
        "supportedGenerationMethods": ["predict"],
    },
]

_GEMINI_CALL_RE = re.compile(r"^/(v1|v1beta|v1alpha)/(models|tunedModels)/([^/:]+):([A-Za-z]+)$")
_GEMINI_LIST_RE = re.compile(r"^/(v1|v1beta|v1alpha)/models/?$")
_GEMINI_GET_RE = re.compile(r"^/(v1|v1beta|v1alpha)/(models|tunedModels)/([^/:]+)$")
_ANTHROPIC_MODEL_RE = re.compile(r"^/v1/models/([^/:]+)$")


def anthropic_error(status: int, err_type: str, message: str) -> Reply:
    """An error in Anthropic's shape, with matching `request-id` header and body `request_id`."""
    rid = new_request_id()
    obj = {"type": "error", "error": {"type": err_type, "message": message}, "request_id": rid}
    return Reply.json(obj, status=status, headers=[("request-id", rid)])


def google_error(code: int, status: str, message: str) -> Reply:
    """An error in Google's shape (pretty-printed like the real API)."""
    obj = {"error": {"code": code, "message": message, "status": status}}
    body = json_module.dumps(obj, indent=2).encode()
    return Reply(status=code, headers=[("content-type", "application/json")], body=body)


def _anthropic_json(obj: Any, status: int = 200) -> Reply:
    return Reply.json(obj, status=status, headers=[("request-id", new_request_id())])


def _google_json(obj: Any) -> Reply:
    return Reply(headers=[("content-type", "application/json")], body=json_module.dumps(obj, indent=2).encode())


def _is_gemini_request(path: str, query: dict[str, str], headers: CIMultiDictProxy[str]) -> bool:
    """Tell Gemini from Anthropic; they share `GET /v1/models[/{id}]`."""
    parts = path.split("/")
    if len(parts) > 1 and parts[1] in ("v1beta", "v1alpha"):
        return True
    if ":" in parts[-1] or "/tunedModels" in path:
        return True
    if "anthropic-version" in headers or "x-api-key" in headers:
        return False
    if "x-goog-api-key" in headers or "x-goog-api-client" in headers or "key" in query:
        return True
    m = _ANTHROPIC_MODEL_RE.match(path)
    return m is not None and not m.group(1).startswith("claude")


def default_reply(method: str, path: str, query: dict[str, str], headers: CIMultiDictProxy[str], body: bytes) -> Reply:
    """The reply for a request when nothing is queued (paths are the upstream's, without gateway prefix)."""
    if _is_gemini_request(path, query, headers):
        return _gemini_reply(method, path, query)
    return _anthropic_reply(method, path, body)


def _anthropic_reply(method: str, path: str, body: bytes) -> Reply:
    if method == "POST" and path == "/v1/messages":
        try:
            payload = json_module.loads(body)
        except ValueError:
            payload = None
        if isinstance(payload, dict) and payload.get("stream") is True:
            return Reply.fixture("anthropic/stream_text.sse")
        return Reply.fixture("anthropic/message.json")
    if method == "POST" and path == "/v1/messages/count_tokens":
        return Reply.fixture("anthropic/count_tokens.json")
    if method == "GET" and path == "/v1/models":
        mid = ANTHROPIC_MODEL["id"]
        return _anthropic_json({"data": [ANTHROPIC_MODEL], "has_more": False, "first_id": mid, "last_id": mid})
    m = _ANTHROPIC_MODEL_RE.match(path)
    if method == "GET" and m:
        if m.group(1) == ANTHROPIC_MODEL["id"]:
            return _anthropic_json(ANTHROPIC_MODEL)
        return anthropic_error(404, "not_found_error", f"model: {m.group(1)}")
    return anthropic_error(404, "not_found_error", "Not Found")


def _gemini_reply(method: str, path: str, query: dict[str, str]) -> Reply:
    m = _GEMINI_CALL_RE.match(path)
    if m and method == "POST":
        version, _kind, model, action = m.groups()
        image = "image" in model
        if action == "generateContent":
            return Reply.fixture("gemini/image_generate_content.json" if image else "gemini/generate_content.json")
        if action == "streamGenerateContent":
            if query.get("alt") == "sse":
                return Reply.fixture("gemini/image_stream.sse" if image else "gemini/stream_generate_content.sse")
            return Reply.fixture("gemini/stream_generate_content_array.json", stream=True)
        if action == "countTokens":
            return Reply.fixture("gemini/count_tokens.json")
        if action == "predict":
            return Reply.fixture("gemini/imagen_predict.json")
        return google_error(
            404,
            "NOT_FOUND",
            f"models/{model} is not found for API version {version}, or is not supported for {action}. "
            "Call ListModels to see the list of available models and their supported methods.",
        )
    if method == "GET" and _GEMINI_LIST_RE.match(path):
        return _google_json({"models": GEMINI_MODELS})
    m = _GEMINI_GET_RE.match(path)
    if method == "GET" and m:
        version, kind, model = m.groups()
        for obj in GEMINI_MODELS:
            if kind == "models" and obj["name"] == f"models/{model}":
                return _google_json(obj)
        return google_error(
            404, "NOT_FOUND", f"{kind}/{model} is not found for API version {version}, or is not supported."
        )
    return google_error(404, "NOT_FOUND", f"Method not found: {method} {path}")


# --------------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------------


class FakeUpstream:
    """Fake Anthropic + Gemini upstream on 127.0.0.1 (random port), running in a background thread."""

    def __init__(self) -> None:
        self.url: str = ""
        self.requests: list[RecordedRequest] = []
        self._cond = threading.Condition()
        self._queue: deque[Reply] = deque()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._listen_sock: socket.socket | None = None
        self._stopping: asyncio.Event | None = None
        self._in_flight = 0

    # ---- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("FakeUpstream already started")
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run_thread, args=(ready, errors), name="FakeUpstream", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            self._thread.join()
            self._thread = None
            raise RuntimeError("FakeUpstream failed to start") from errors[0]

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                fut.result(timeout=_SHUTDOWN_TIMEOUT + 5)
            finally:
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None
        self._loop = None

    def __enter__(self) -> FakeUpstream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run_thread(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._startup())
            except BaseException as exc:
                errors.append(exc)
                return
            self._loop = loop
            ready.set()
            loop.run_forever()
            # Anything still pending after shutdown (should be nothing) gets cancelled.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            ready.set()
            asyncio.set_event_loop(None)
            loop.close()

    async def _startup(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=_MAX_REQUEST_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=_SHUTDOWN_TIMEOUT,
            handler_cancellation=True,  # a client that gives up cancels its (possibly hung) handler
            auto_decompress=False,  # record request bodies exactly as received
        )
        await runner.setup()
        # Our own listening socket, so that shutdown can stop accepting before closing it (see _shutdown).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            site = web.SockSite(runner, sock)
            await site.start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._listen_sock = sock
        self._runner = runner
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def _shutdown(self) -> None:
        assert self._stopping is not None
        self._stopping.set()  # wakes hung and delayed handlers, which abort their connections
        runner = self._runner
        if runner is None:
            return
        server = runner.server
        # Stop accepting, but let connections accepted a moment ago finish their setup before the listening
        # server is closed: on Python 3.11, closing it first leaks their sockets (asyncio's Server._attach
        # asserts on a closed server and the half-made transport is dropped unclosed).
        if self._listen_sock is not None:
            asyncio.get_running_loop().remove_reader(self._listen_sock.fileno())
        for _ in range(10):
            await asyncio.sleep(0)
        _abort_all_connections(server)
        await runner.cleanup()  # closes the listening socket too
        for _ in range(10):
            await asyncio.sleep(0)
        _abort_all_connections(server)
        self._runner = None
        self._listen_sock = None

    # ---- test-facing API --------------------------------------------------------------------------------

    def enqueue(self, *replies: Reply) -> None:
        """Queue replies (FIFO); each next request gets one instead of the default routing."""
        with self._cond:
            self._queue.extend(replies)

    def reset(self) -> None:
        """Clear queued replies and recorded requests."""
        with self._cond:
            self._queue.clear()
            self.requests.clear()

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least `n` requests were recorded; return a snapshot of all recorded requests.

        Raises TimeoutError if fewer than `n` arrived within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"expected {n} request(s) within {timeout}s, got {len(self.requests)}: "
                        + ", ".join(f"{r.method} {r.path}" for r in self.requests)
                    )
                self._cond.wait(remaining)
            return list(self.requests)

    @property
    def active_connections(self) -> int:
        """Client TCP connections currently open (idle keep-alive ones included)."""
        return self._in_loop(self._count_connections)

    @property
    def active_requests(self) -> int:
        """Requests whose handler is still running (e.g. a hung stream)."""
        return self._in_loop(lambda: self._in_flight)

    def _in_loop(self, fn: Any) -> int:
        loop = self._loop
        if loop is None or not loop.is_running():
            return 0

        async def call() -> int:
            return int(fn())

        return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=5)

    def _count_connections(self) -> int:
        runner = self._runner
        if runner is None or runner.server is None:
            return 0
        return sum(1 for h in runner.server.connections if h.transport is not None)

    # ---- request handling ---------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self._in_flight += 1
        try:
            return await self._handle_inner(request)
        finally:
            self._in_flight -= 1

    async def _handle_inner(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        raw_path = request.raw_path.split("?", 1)[0]
        headers = [
            (k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for k, v in request.raw_headers
        ]
        recorded = RecordedRequest(
            method=request.method, path=raw_path, query=request.query_string, headers=headers, body=body
        )
        with self._cond:
            self.requests.append(recorded)
            reply = self._queue.popleft() if self._queue else None
            self._cond.notify_all()
        if reply is None:
            reply = default_reply(request.method, request.path, dict(request.query), request.headers, body)
        return await self._send(request, reply)

    async def _pause(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True if the server started stopping meanwhile."""
        assert self._stopping is not None
        if self._stopping.is_set():
            return True
        if seconds <= 0:
            return False
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        """Hold the connection open until the server stops (or the client gives up, cancelling us)."""
        assert self._stopping is not None
        await self._stopping.wait()
        return await self._abort(request)

    async def _abort(self, request: web.Request) -> web.StreamResponse:
        """Reset the connection at once (server stopping) and end the handler without a response."""
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        """Close the connection mid-response: bytes already written are delivered, then FIN, no terminator."""
        if request.transport is not None:
            request.transport.close()  # unlike abort(), never discards bytes still in a user-space buffer
        raise asyncio.CancelledError

    async def _send(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        if reply.delay_before > 0 and await self._pause(reply.delay_before):
            return await self._abort(request)

        resp = web.StreamResponse(status=reply.status)
        hdrs: CIMultiDict[str] = CIMultiDict()
        for k, v in reply.headers:
            hdrs.add(k, v)
        if reply.gzip and "content-encoding" not in hdrs:
            hdrs.add("content-encoding", "gzip")
        resp.headers.extend(hdrs)

        if reply.chunks is None:
            body = gzip_module.compress(reply.body) if reply.gzip else reply.body
            resp.content_length = len(body)
            chunks = [body]
        else:
            chunks = _gzip_chunks(reply.chunks) if reply.gzip else reply.chunks
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        writer = request.writer
        for i, chunk in enumerate(chunks):
            if reply.hang_after is not None and i >= reply.hang_after:
                return await self._hang(request)
            if reply.drop_after is not None and i >= reply.drop_after:
                return await self._drop(request)
            if i > 0 and reply.delay_between > 0 and await self._pause(reply.delay_between):
                return await self._abort(request)
            if chunk:
                await resp.write(chunk)
                await writer.drain()
        n = len(chunks)
        if reply.hang_after is not None and n >= reply.hang_after:
            return await self._hang(request)
        if reply.drop_after is not None and n >= reply.drop_after:
            return await self._drop(request)
        await resp.write_eof()
        return resp


def _abort_all_connections(server: web.Server | None) -> None:
    if server is None:
        return
    for handler in server.connections:
        if handler.transport is not None:
            handler.transport.abort()


def _gzip_chunks(chunks: list[bytes]) -> list[bytes]:
    """Gzip a chunk stream, sync-flushing after each chunk so every chunk is decodable on arrival."""
    comp = zlib.compressobj(wbits=31)
    out = [comp.compress(c) + comp.flush(zlib.Z_SYNC_FLUSH) for c in chunks]
    tail = comp.flush()
    if out:
        out[-1] += tail
    else:
        out.append(tail)
    return out
