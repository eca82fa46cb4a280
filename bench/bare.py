"""Bare pass-through proxies: the floor for the gateway's stack (no auth, no billing).

Two ASGI apps with the gateway's URL layout (`/anthropic/...` and `/gemini/...`, prefix
stripped before forwarding to the upstream):

- ``starlette``: a Starlette route using ``Request`` + ``StreamingResponse`` + aiohttp, the
  straightforward way to write the proxy.
- ``raw``: a raw ASGI endpoint mounted inside Starlette; it reads the body from ``receive``
  and relays the upstream's status, raw header list and chunks with ``send`` (no
  Request/StreamingResponse on the hot path).

Both share one tuned aiohttp ``ClientSession`` (no cookie jar, no decompression, no auto
headers, unlimited keep-alive pool, no redirects), relay the raw header list (repeated
headers kept) and drop hop-by-hop headers. Both run with the gateway's process settings, which
are not billing work: the collector tuned as ``gateway serve`` tunes it (``gateway.collector``) and uvicorn
without its proxy-headers middleware (``--no-proxy-headers``; the gateway reads no client
address either). Measured with perf on Anthropic JSON at 16 connections, the default collector
cost the bare proxy ~16 us of its ~350 us per request.

Run (what ``bench/run.py`` does)::

    BARE_MODE=raw BARE_UPSTREAM=http://127.0.0.1:9000 \\
      uvicorn --app-dir bench --factory bare:create_app --loop uvloop --http httptools \\
      --no-access-log --no-proxy-headers --log-level warning --port 8001

or ``python bench/bare.py --mode raw --upstream http://127.0.0.1:9000 --port 8001``; with ``--workers 2``
it runs the gateway's supervisor (``gateway.workers``: a listening socket per worker), as
``gateway serve --workers 2`` does, so both spread connections over their workers alike.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Mount, Route

from gateway.collector import tune_collector

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PREFIXES = ("anthropic", "gemini")

# Hop-by-hop headers (RFC 9110 7.6.1) plus the ones the client library sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length"}
REQUEST_DROP_B = frozenset(h.encode() for h in REQUEST_DROP)
RESPONSE_DROP_B = frozenset(h.encode() for h in HOP_BY_HOP)


def make_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
    )


class Upstream:
    """The shared client: one session for the process, opened in the lifespan."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "lifespan not started"
        return self._session

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._session = make_session()
        try:
            yield
        finally:
            await self._session.close()


def request_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw if k.lower() not in REQUEST_DROP_B]


def response_headers(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    return [(k.lower(), v) for k, v in raw if k.lower() not in RESPONSE_DROP_B]


# --- starlette: Request + StreamingResponse -------------------------------------------------


def create_starlette_app(upstream_url: str) -> Starlette:
    upstream = Upstream(upstream_url)

    async def proxy(request: Request) -> Response:
        path = request.url.path.split("/", 2)[2]  # "/anthropic/v1/messages" -> "v1/messages"
        url = f"{upstream.base}/{path}"
        if request.url.query:
            url = f"{url}?{request.url.query}"
        body = await request.body()
        resp = await upstream.session.request(
            request.method,
            url,
            headers=request_headers(request.headers.raw),
            data=body,
            allow_redirects=False,
        )

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.content.iter_any():
                    yield chunk
            finally:
                resp.release()

        response = StreamingResponse(relay(), status_code=resp.status)
        response.raw_headers = response_headers(resp.raw_headers)
        return response

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    routes = [Route(f"/{p}/{{path:path}}", proxy, methods=methods) for p in PREFIXES]
    return Starlette(routes=routes, lifespan=upstream.lifespan)


# --- raw: ASGI endpoint inside Starlette ---------------------------------------------------


class RawProxy:
    """Raw ASGI endpoint: forwards `<prefix>/<rest>` to `<upstream>/<rest>`."""

    def __init__(self, upstream: Upstream, prefix: str) -> None:
        self.upstream = upstream
        self.strip = len(prefix)  # "/anthropic"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path: bytes | None = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        url = self.upstream.base + path[self.strip :]
        query: bytes = scope.get("query_string", b"")
        if query:
            url = f"{url}?{query.decode('latin-1')}"
        message = await receive()
        body: bytes = message.get("body", b"")
        while message.get("more_body", False):
            message = await receive()
            body += message.get("body", b"")
        async with self.upstream.session.request(
            scope["method"],
            url,
            headers=request_headers(scope["headers"]),
            data=body,
            allow_redirects=False,
        ) as resp:
            headers = response_headers(resp.raw_headers)
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            if resp.content_length is not None and resp.content_length <= 1 << 20:
                # A sized, small body (JSON): one read, one send.
                data = await resp.read()
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def create_raw_app(upstream_url: str) -> Starlette:
    upstream = Upstream(upstream_url)
    routes = [Mount(f"/{p}", app=RawProxy(upstream, f"/{p}")) for p in PREFIXES]
    return Starlette(routes=routes, lifespan=upstream.lifespan)


MODES: dict[str, Callable[[str], Starlette]] = {"starlette": create_starlette_app, "raw": create_raw_app}


def create_app() -> Starlette:
    """uvicorn factory: BARE_MODE (starlette|raw) and BARE_UPSTREAM from the environment."""
    mode = os.environ.get("BARE_MODE", "raw")
    if mode not in MODES:
        raise SystemExit(f"BARE_MODE must be one of {', '.join(MODES)}, got {mode!r}")
    app = MODES[mode](os.environ.get("BARE_UPSTREAM", "http://127.0.0.1:9000"))
    tune_collector()  # as `gateway serve`: the comparison measures billing work, not a default
    return app


# uvicorn's settings for both ways of serving (as `gateway serve` runs: see the module docstring)
SERVER: dict[str, Any] = dict(
    loop="uvloop", http="httptools", access_log=False, proxy_headers=False, log_level="warning"
)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), default=os.environ.get("BARE_MODE", "raw"))
    parser.add_argument("--upstream", default=os.environ.get("BARE_UPSTREAM", "http://127.0.0.1:9000"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    help_workers = "> 1: processes each on a socket of its own, as `gateway serve --workers`"
    parser.add_argument("--workers", type=int, default=1, help=help_workers)
    args = parser.parse_args()
    if args.workers > 1:
        _serve_workers(args)
        return
    app = MODES[args.mode](args.upstream)
    tune_collector()  # as `gateway serve`: the comparison measures billing work, not a default
    uvicorn.run(app, host=args.host, port=args.port, **SERVER)


def _serve_workers(args: argparse.Namespace) -> None:
    """The gateway's own supervisor (`gateway.workers`): the same spread of connections over workers."""
    import uvicorn

    from gateway.workers import Supervisor, reserve

    os.environ.update(BARE_MODE=args.mode, BARE_UPSTREAM=args.upstream)  # the workers' create_app reads them
    config = uvicorn.Config(
        "bare:create_app", factory=True, host=args.host, port=args.port, workers=args.workers, **SERVER
    )
    sock = reserve(args.host, args.port)
    try:
        Supervisor(config, sock, on_exit=lambda pid: None).run()
    finally:
        sock.close()


if __name__ == "__main__":
    main()
