"""The hot path: a raw ASGI endpoint per provider.

`ProxyEndpoint.__call__` reads top to bottom: authenticate -> read and check -> begin billing
(rate limit, reservation, journal) -> forward and meter -> finish billing. No Starlette
Request/Response objects here: the bytes of the upstream response are relayed as they arrive,
and the meter only observes them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from time import perf_counter
from typing import Any

import aiohttp
import orjson

from gateway.answers import ErrorAnswers
from gateway.billing.owner import Hold, RefusalKind, Result
from gateway.deadlines import log_store_failure, within
from gateway.holdback import release, settle
from gateway.logs import REQUEST_ID
from gateway.metering import ContentDecoder, Usage
from gateway.outcomes import Outcome
from gateway.providers.base import DROP_RESPONSE_HEADERS, Call, InvalidRequest, Provider, Route, header
from gateway.services import Services
from gateway.store.base import RequestRecord
from gateway.timeutil import stamp

log = logging.getLogger("gateway.proxy")

Scope = dict[str, Any]


class ClientGone(Exception):
    pass


# Route labels of requests no provider route matched (the raw path would make a label per path).
UNMATCHED, INVALID = "unmatched", "invalid"
MAX_ROUTES = 1024  # routes remembered per provider (a Gemini route names its model: unbounded)
WATCH_AFTER_SECONDS = 0.25  # a stream watches for its client leaving once it has run this long
# The outcomes every request takes, as globals: a member looked up on its Enum class costs several
# times a global's lookup on Python 3.11.
_OK, _UPSTREAM_ERROR, _GATEWAY_ERROR = Outcome.OK, Outcome.UPSTREAM_ERROR, Outcome.GATEWAY_ERROR
_IDENTITY = (b"", b"identity")  # request content-encodings the body is read as is


def new_request_id() -> str:
    """Time-ordered (ms clock, then random): ids and the external ids derived from them append to
    the store's indexes instead of landing on random pages."""
    return f"req_{time.time_ns() // 1_000_000:012x}{random.getrandbits(64):016x}"  # ids are not secrets


async def read_body(receive: Any, limit: int) -> bytes | None:
    """The whole request body, or None when it exceeds `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class ProxyEndpoint:
    def __init__(self, provider: Provider, services: Services, prefix: str) -> None:
        self.provider = provider
        self.s = services
        self.prefix = prefix
        self._metrics = services.metrics.for_provider(provider.name)
        self._routes: dict[tuple[str, str, bytes], Route] = {}  # (see `_match`)
        settings = services.settings
        self._answer = ErrorAnswers(provider, settings.max_body_bytes)
        self._timeout = aiohttp.ClientTimeout(
            total=None,  # streams may run for any length of time; silence is what is bounded
            sock_connect=settings.connect_timeout_seconds,
            sock_read=settings.upstream_timeout_seconds,
        )

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        # One coroutine serves the request (the hot path's awaits pass through each layer).
        arrived = perf_counter()
        request_id = new_request_id()
        REQUEST_ID.set(request_id)  # (this task serves only this request)
        provider, s = self.provider, self.s
        count = self._metrics.request  # every answer is counted by its route operation and status
        rid = (b"x-gateway-request-id", request_id.encode())
        method, query, headers = scope["method"], scope["query_string"], scope["headers"]
        path = scope["path"][len(self.prefix) :]

        try:
            route = self._routes.get((method, path, query)) or self._match(method, path, query)
        except InvalidRequest as exc:
            return count(INVALID, await self._answer.error(send, 400, "invalid_request_error", str(exc), rid))
        if route is None:
            message = f"{method} {path} is not served by the gateway"
            return count(UNMATCHED, await self._answer.error(send, 404, "not_found", message, rid))
        op = route.operation

        # 1. authenticate
        key = provider.extract_key(headers, query)
        try:
            ident = s.keys.cached(key) or await within(s.keys.authenticate(key), s.settings.store_timeout_seconds)
        except Exception as exc:
            log_store_failure(log, "could not check a key", exc)
            s.metrics.refused(503, RefusalKind.STORE_UNAVAILABLE.value)
            s.refusals.count(503, RefusalKind.STORE_UNAVAILABLE.value)
            return count(op, await self._answer.unavailable(send, "the gateway cannot check keys right now", rid))
        if ident is None:
            s.metrics.refused(401, "invalid_key")
            s.refusals.count(401, "invalid_key")
            return count(
                op, await self._answer.error(send, 401, "authentication_error", "invalid or revoked gateway key", rid)
            )

        # 2. read and check the request
        body, obj = b"", None
        if route.has_body:
            length = header(headers, b"content-length")
            if length is not None and length.isdigit() and int(length) > s.settings.max_body_bytes:
                return count(op, await self._answer.too_large(send, rid))
            try:
                maybe = await read_body(receive, s.settings.max_body_bytes)
            except ClientGone:
                return  # the client left: nothing answered, nothing counted
            if maybe is None:
                return count(op, await self._answer.too_large(send, rid))
            body = maybe
            encoding = header(headers, b"content-encoding")
            if encoding is not None and encoding.strip().lower() not in _IDENTITY:
                # The reservation is sized from the body as read: an encoded one would be misread (or,
                # JSON that only claims an encoding, forwarded for the provider to decode into more).
                return count(op, await self._answer.compressed(send, rid))
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                return count(
                    op, await self._answer.error(send, 400, "invalid_request_error", f"malformed JSON body: {exc}", rid)
                )
            if not isinstance(obj, dict):
                message = "the JSON body must be an object"
                return count(op, await self._answer.error(send, 400, "invalid_request_error", message, rid))
        call = provider.prepare(route, body, obj) if route.metered else None
        if call is not None and "\x00" in call.model:  # no model has one, and PostgreSQL cannot store it
            message = "the model name may not hold a NUL character"
            return count(op, await self._answer.error(send, 400, "invalid_request_error", message, rid))

        # 3. begin billing: rate limit, then quota (check and reserve in one step), then the journal
        if call is None:
            refused = await s.billing.admit(ident.user_id)
            if refused is not None:
                return count(op, await self._answer.refusal(send, refused, rid))
            plain = await self._forward(route, None, body, headers, send, receive, rid, arrived)
            return count(op, plain.status or 0)
        started_at, started_iso = stamp()
        record = RequestRecord(
            id=request_id,
            user_id=ident.user_id,
            key_id=ident.key_id,
            provider=provider.name,
            model=call.model or route.model,
            operation=route.operation,
            stream=call.stream,
            started_at=started_at,
            started_iso=started_iso,
            reservation=call.reservation,
            owner=s.owner,
        )
        hold = s.billing.begin_now(record, call.rate_tokens) or await s.billing.begin(record, call.rate_tokens)
        if not isinstance(hold, Hold):
            return count(op, await self._answer.refusal(send, hold, rid))

        # 4. forward, metering beside the relay
        try:
            result = await self._forward(route, call, body, headers, send, receive, rid, arrived)
        except BaseException:
            # The relay itself failed: the provider may still have billed, so bill the reservation, estimated.
            hold.finish(Result(500, _GATEWAY_ERROR, None, estimated=True))
            raise
        # 5. finish billing: the final usage journaled, the ledger moved from reserved to consumed
        hold.finish(result)
        count(op, result.status or 0)

    def _match(self, method: str, path: str, query: bytes) -> Route | None:
        """`provider.match`, remembered: a route depends on nothing but these three, and clients
        send the same few again and again. Neither unmatched requests nor queries that carry a
        key (a secret) are kept."""
        route = self.provider.match(method, path, query)
        if route is not None and query.find(b"key=") < 0 and query.find(b"%") < 0:
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()
            self._routes[(method, path, query)] = route
        return route

    async def _forward(
        self,
        route: Route,
        call: Call | None,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        send: Any,
        receive: Any,
        rid: tuple[bytes, bytes],
        arrived: float,
    ) -> Result:
        provider, settings = self.provider, self.s.settings
        forwarded = perf_counter()
        try:
            resp = await self.s.http.request(
                "POST" if route.has_body else "GET",
                provider.upstream + route.upstream_path,
                data=body if route.has_body else None,
                headers=provider.upstream_headers(headers),
                allow_redirects=False,
                timeout=self._timeout,
            )
        except TimeoutError:
            await self._answer.error(send, 504, "timeout_error", "the provider did not answer in time", rid)
            return Result(504, Outcome.TIMEOUT, None)
        except aiohttp.ClientError as exc:
            log.warning("upstream %s unreachable: %s", provider.name, type(exc).__name__)
            await self._answer.error(send, 502, "api_error", "the provider could not be reached", rid)
            return Result(502, Outcome.UPSTREAM_UNREACHABLE, None)

        self._metrics.forwarded(forwarded - arrived, perf_counter() - forwarded)
        async with resp:
            status = resp.status
            out_headers = [(lk, v) for k, v in resp.raw_headers if (lk := k.lower()) not in DROP_RESPONSE_HEADERS]
            out_headers.append(rid)
            await send({"type": "http.response.start", "status": status, "headers": out_headers})
            if call is None:
                return await self._relay_plain(resp, send, status)
            decoder = ContentDecoder.for_encoding(resp.headers.get("content-encoding"))
            streamed = call.stream and status == 200 and call.meter_factory is not None
            meter = call.meter_factory() if streamed and call.meter_factory else None
            decode = None if decoder.identity else decoder.decode  # (a call per chunk saved)
            parts: list[bytes] = []  # a JSON body's chunks, joined once (one chunk: no copy)
            # An SSE stream reaches the client in whole events (see gateway.holdback): while its meter's
            # parser is idle after a chunk, the bytes so far end with one (what providers write); else the
            # bytes after the last event wait in `held`. A compressed stream cannot be cut at its events
            # (nor is its parser fed the bytes relayed): it is relayed as it comes.
            held: list[bytes] = []
            parser = meter.sse if meter is not None and decode is None else None
            # A JSON body is read to its end anyway; a stream needs its drain bounded when the client leaves.
            watch = _DisconnectWatch(receive, resp, settings.drain_timeout_seconds) if meter is not None else None
            outcome, drained, ended = _OK if status < 400 else _UPSTREAM_ERROR, 0, False
            content = resp.content
            try:
                while chunk := await content.readany():
                    if meter is not None:
                        meter.feed(chunk if decode is None else decode(chunk))
                    else:
                        parts.append(chunk)
                    if watch is None or not watch.gone:
                        # The last chunk carries the end of the body: one send (and write) fewer.
                        ended = content.at_eof()
                        if parser is not None and (held or not parser.idle):
                            if ended:  # the end: a final event without its blank line goes as it is
                                held.append(chunk)
                                chunk = b"".join(held)
                                held.clear()
                            elif not (chunk := release(held, chunk)):
                                continue
                        await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
                        continue
                    drained += len(chunk)
                    if drained > settings.drain_max_bytes or (meter is not None and meter.usage().final):
                        break
            except TimeoutError:
                outcome = Outcome.TIMEOUT
                if meter is not None and decode is None:
                    # A partial event held back is dropped: the error event follows whole ones.
                    await self._stream_error(
                        send, route, settle(held), 504, "timeout_error", "the provider stalled mid-response"
                    )
                else:
                    # A JSON body takes no error event, nor a compressed stream (plain bytes after its encoded
                    # ones would corrupt it): left cut, the server closes the connection.
                    ended = True
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                if watch is None or not watch.expired:
                    outcome = Outcome.UPSTREAM_BROKEN
                    if meter is not None and decode is None:
                        await self._stream_error(
                            send, route, settle(held), 502, "api_error", "the provider connection broke mid-response"
                        )
                    else:
                        ended = True  # (as above)
            finally:
                if watch is not None:
                    watch.stop()
            if not ended:
                # A stream that ended after its last chunk: what is held goes as it is (to a client still there).
                rest = b"".join(held) if held and (watch is None or not watch.gone) else b""
                await send({"type": "http.response.body", "body": rest, "more_body": False})
            usage: Usage | None
            estimated = False
            if meter is not None:
                usage = meter.usage()
                if watch is not None and watch.gone:
                    # The client left; whatever the upstream did after, what we billed is what it reported.
                    outcome = Outcome.CLIENT_DISCONNECTED
                    # Estimated only when the drain bound cut it: a stream the provider ended is what it reported.
                    estimated = not usage.final and (watch.expired or drained > settings.drain_max_bytes)
                elif usage.error is not None and outcome is _OK:
                    outcome = Outcome.UPSTREAM_ERROR_MIDSTREAM
            else:
                usage = call.body_usage(decoder.decode(b"".join(parts))) if parts else None
            return Result(status, outcome, usage, estimated)

    async def _relay_plain(self, resp: aiohttp.ClientResponse, send: Any, status: int) -> Result:
        outcome, ended = _OK, False
        try:
            async for chunk in resp.content.iter_any():
                ended = resp.content.at_eof()
                await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
        except (TimeoutError, aiohttp.ClientError):
            outcome = Outcome.UPSTREAM_BROKEN
            ended = True  # left cut: the server closes the connection, as the provider did
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        return Result(status, outcome, None)

    async def _stream_error(self, send: Any, route: Route, before: bytes, status: int, kind: str, message: str) -> None:
        event = self.provider.stream_error_event(route, status, kind, message)
        if event or before:
            await send({"type": "http.response.body", "body": before + event, "more_body": True})


class _DisconnectWatch:
    """Notices a client that left a stream; gives the upstream `drain_seconds` more to report usage, then cuts it.

    Watching takes a task reading `receive()`; it starts only once the stream has run for
    `WATCH_AFTER_SECONDS` (a timer until then), so a stream that ends sooner costs no task. A client
    that leaves earlier is noticed then: the drain bound starts at most that much later, and a stream
    that ends before it is simply read to its end, metered exactly, as if the client had stayed.
    """

    __slots__ = ("_drain", "_receive", "_resp", "_task", "_timer", "expired", "gone")

    def __init__(self, receive: Any, resp: aiohttp.ClientResponse, drain_seconds: float) -> None:
        self.gone = False  # the client left
        self.expired = False  # ... and the drain bound passed: the upstream was cut
        self._receive, self._resp, self._drain = receive, resp, drain_seconds
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            WATCH_AFTER_SECONDS, self._start
        )

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        await asyncio.sleep(self._drain)
        self.expired = True
        self._resp.close()

    def stop(self) -> None:
        # Drop the references too: the task's coroutine refers to this object, so keeping the task
        # here would make a cycle that only the cyclic collector frees, holding the response and the
        # server's request cycle with it (measured: +30 MB at 256 slow streams).
        timer, task = self._timer, self._task
        self._timer = self._task = None
        if timer is not None:
            timer.cancel()
        if task is not None:
            task.cancel()
