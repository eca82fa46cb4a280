"""The gateway's own HTTP API (admin, billing, webhooks): its one error shape, its bounded body reader and
its bounded store calls.

Every error is `{"error": {"type": ..., "message": ...}}`. The provider routes answer in the provider's
own shape instead (see `gateway/providers/`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from gateway.deadlines import StoreTimeout, log_store_failure, within

log = logging.getLogger("gateway.api")

# Admin and webhook bodies are small JSON documents; Polar's largest payloads are far below this.
MAX_BODY_BYTES = 1024 * 1024

_TYPES = {
    400: "invalid_request",
    401: "authentication_error",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "internal_error",
    503: "unavailable",
}


def api_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error response of the gateway's own API; the type follows from the status."""
    return JSONResponse({"error": {"type": _TYPES.get(status, "error"), "message": message}}, status, headers)


class BodyRefused(Exception):
    """A request body the endpoint will not take; `response` says why."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _too_large(limit: int) -> BodyRefused:
    # The rest of the body is never read: closing the connection stops the client sending it.
    return BodyRefused(api_error(413, f"request body exceeds {limit} bytes", {"connection": "close"}))


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, read chunk by chunk and refused (413) as soon as it passes `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise BodyRefused(api_error(400, "the client disconnected before the body ended")) from None
    return b"".join(chunks)


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> Any:
    """The body parsed as JSON. orjson refuses deep nesting with a decode error, not a RecursionError."""
    body = await read_body(request, limit)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BodyRefused(api_error(400, f"malformed JSON body: {exc}")) from None


T = TypeVar("T")


class StoreUnavailable(Exception):
    """A store call that did not answer in time, or failed: the request is answered with a 503."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def response(self) -> JSONResponse:
        return api_error(503, self.message, {"retry-after": "1"})


async def from_store(
    call: Coroutine[Any, Any, T], seconds: float, what: str, late: Callable[[T], None] | None = None
) -> T:
    """`await call` for at most `seconds` (`deadlines.within`); StoreUnavailable if it does not answer
    or raises, logged once as `what`. Whatever the call raises counts as the store's failure: check the
    request before the call. The message names no DSN and carries no exception text."""
    try:
        return await within(call, seconds, late)
    except Exception as exc:
        log_store_failure(log, what, exc)
        if isinstance(exc, StoreTimeout):
            raise StoreUnavailable(f"the gateway's database did not answer within {seconds:g} s; retry later") from None
        raise StoreUnavailable("the gateway's database failed to answer; retry later") from None


async def not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else None  # a 405 says what is allowed
    what = "method not allowed" if status == 405 else "not found"
    return api_error(status, f"{request.method} {request.url.path}: {what}", headers)


async def server_error(request: Request, exc: Exception) -> Response:
    # The exception is re-raised after this answer and logged by the server; its text never reaches the client.
    return api_error(500, "internal error")
