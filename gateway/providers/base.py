"""What a provider contributes to the shared proxy core: routes, auth, error shape, metering.

Everything else (pre-check, forwarding, relay, recording) is provider-neutral in
`gateway/proxy.py`; a provider module stays small.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.metering import StreamMeter, Usage

Headers = list[tuple[bytes, bytes]]

# Request headers never forwarded upstream: hop-by-hop, framing we recompute, credentials, and what
# would hide the usage from the meter.
DROP_REQUEST_HEADERS = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
        b"authorization",
        b"x-api-key",
        b"x-goog-api-key",
        b"x-goog-fieldmask",  # Google's response field mask: it could leave the usage out of the answer
        b"cookie",
        b"accept-encoding",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-real-ip",
    }
)
# Response headers never relayed back: hop-by-hop ones (uvicorn frames the body itself).
DROP_RESPONSE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-connection",
        b"set-cookie",
    }
)
_DECODABLE = {"gzip", "x-gzip", "deflate", "identity"}
# What model ids are made of (`gemini-2.5-flash`, `imagen-4.0-generate-001`, `claude-sonnet-4-6`). Routes match
# the percent-decoded path, so a `?`, `#`, `%` or `/` decoded out of a model name would rewrite the upstream URL:
# with every variable segment held to these characters, the decoded path is also the safe one to forward.
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class InvalidRequest(ValueError):
    """A request the gateway could not meter as the provider would answer it: refused with 400,
    never forwarded."""


class InvalidModel(InvalidRequest):
    """A path whose model segment is not a model id."""


def check_model(model: str) -> str:
    if _MODEL_ID.fullmatch(model) is None:
        raise InvalidModel("the model name may only contain letters, digits, '.', '-' and '_'")
    return model


def accept_encoding(value: bytes | None) -> bytes | None:
    """Keep only encodings the meter can decode, so compressed bodies can be relayed as received."""
    if not value:
        return None
    kept = [p.strip() for p in value.decode("latin-1").split(",") if p.split(";")[0].strip().lower() in _DECODABLE]
    return ", ".join(kept).encode() if kept else None


@dataclass(slots=True)  # built per request: not frozen, whose __init__ costs a call per field
class Route:
    """A matched provider route. `metered` routes reserve quota and become request records."""

    operation: str
    upstream_path: str  # path + query to send upstream (gateway prefix removed, `key=` removed)
    model: str
    metered: bool
    has_body: bool
    stream: bool = False  # known from the path (gemini) or decided from the body (anthropic)
    sse: bool = False  # gemini: the query's `alt` parameter asks for SSE (else a JSON array is streamed)


@dataclass(slots=True)
class Call:
    """A metered call, prepared from the route and the parsed body."""

    route: Route
    model: str
    stream: bool
    reservation: dict[str, int]  # meter -> most it can consume
    rate_tokens: int  # tokens counted against tokens-per-minute at pre-check
    meter_factory: Callable[[], StreamMeter] | None  # incremental meter for streamed bodies
    body_usage: Callable[[bytes], Usage]  # usage from a whole (non-stream) body


class Provider(Protocol):
    name: str
    upstream: str

    @property
    def meters(self) -> tuple[str, ...]: ...

    def match(self, method: str, path: str, query: bytes) -> Route | None:
        """The route for a (decoded) path, None when not served; raises InvalidModel for a bad model segment."""
        ...

    def extract_key(self, headers: Headers, query: bytes) -> str | None: ...
    def upstream_headers(self, headers: Headers) -> list[tuple[str, str]]: ...
    def prepare(self, route: Route, body: bytes, obj: Any) -> Call: ...
    def error_body(self, status: int, kind: str, message: str, extra: dict[str, Any] | None = None) -> bytes: ...
    def stream_error_event(self, route: Route, status: int, kind: str, message: str) -> bytes: ...


# Request header names arrive lowercased: the ASGI spec has servers lowercase them (uvicorn does,
# and Starlette's own Headers relies on it), so nothing here lowercases them again per request.


# Forwarded header names, decoded once: clients send the same few names again and again. A dropped
# name maps to "" (`accept-encoding` too, which is filtered apart). Bounded like the route cache.
_FORWARD_NAMES: dict[bytes, str] = {}
_MAX_FORWARD_NAMES = 1024


def _forward_name(name: bytes) -> str:
    if len(_FORWARD_NAMES) >= _MAX_FORWARD_NAMES:
        _FORWARD_NAMES.clear()
    decoded = _FORWARD_NAMES[name] = "" if name in DROP_REQUEST_HEADERS else name.decode("latin-1")
    return decoded


@functools.lru_cache(maxsize=64)  # a client sends the same value every time
def _forwarded_encoding(value: bytes) -> str:
    kept = accept_encoding(value)
    return kept.decode("latin-1") if kept else ""


# Asked for when the client accepts no coding the meter decodes (or sends no Accept-Encoding): without
# the header any coding is acceptable (RFC 9110), and a body in one the meter cannot read is billed nothing.
_IDENTITY_ONLY = ("accept-encoding", "identity")


def forward_headers(headers: Headers, credential: tuple[str, str]) -> list[tuple[str, str]]:
    names = _FORWARD_NAMES
    out: list[tuple[str, str]] = []
    encoding: tuple[str, str] = _IDENTITY_ONLY
    for name, value in headers:
        forwarded = names.get(name)
        if forwarded is None:
            forwarded = _forward_name(name)
        if forwarded:
            out.append((forwarded, value.decode("latin-1")))
        elif name == b"accept-encoding" and (kept := _forwarded_encoding(value)):
            encoding = ("accept-encoding", kept)
    out.append(encoding)
    out.append(credential)
    return out


def header(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None
