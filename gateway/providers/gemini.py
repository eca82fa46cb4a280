"""Gemini API specifics: versioned model routes, `x-goog-api-key` / `?key=` auth, Google error shape."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

from gateway.metering import (
    GeminiArrayMeter,
    GeminiSSEMeter,
    StreamMeter,
    gemini_media,
    requested_max_output,
    usage_from_predict,
    usage_from_response,
    wants_images,
)
from gateway.metering.estimate import GEMINI_IMAGE_MAX_TOKENS, image_model, requested_candidates
from gateway.metering.server_tools import input_ceiling, offers_gemini_server_tools
from gateway.meters import GEMINI_CACHED, GEMINI_IMAGES, GEMINI_INPUT, GEMINI_METERS, GEMINI_OUTPUT
from gateway.providers.base import Call, Headers, InvalidRequest, Route, check_model, forward_headers

_METHOD_RE = re.compile(r"^/(v1|v1beta|v1alpha)/(models|tunedModels)/([^/:]+):([A-Za-z]+)$")
_MODELS_RE = re.compile(r"^/(v1|v1beta|v1alpha)/models(?:/([^/:]+))?$")
_OPERATIONS = {
    "generateContent": ("generate", True),
    "streamGenerateContent": ("stream_generate", True),
    "predict": ("predict", True),
    "countTokens": ("count_tokens", False),
}
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "FAILED_PRECONDITION",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _strip_key(query: bytes) -> tuple[str, str | None]:
    """Query without `key=` (it is the user's gateway key), and that key."""
    if not query:
        return "", None
    if query.find(b"key=") < 0 and query.find(b"%") < 0:  # no key (`?alt=sse`, the usual query): nothing to parse
        return query.decode("latin-1"), None
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    key = next((v for k, v in pairs if k == "key"), None)
    if key is None:
        return query.decode("latin-1"), None
    return urlencode([(k, v) for k, v in pairs if k != "key"]), key


# System parameters every Google API honours that reshape the answer: a field mask (`fields=candidates`)
# leaves `usageMetadata` out, JSONP (`callback=f`) wraps the JSON in `f(...)`. Either way no usage could be
# read. (The mask's header, X-Goog-FieldMask, is never forwarded: see `DROP_REQUEST_HEADERS`.)
_RESHAPING = frozenset({"fields", "$fields", "callback", "$callback"})


def _metered_answer_is_sse(qs: str, stream: bool) -> bool:
    """Whether a metered call's query asks for its answer as SSE (`alt` or `$alt`), refusing a query whose
    answer the meter could not read: a parameter that reshapes it (`_RESHAPING`), or any other format than
    JSON (and SSE for a stream): `alt=proto`, or a guess either way (`?quotaUser=alt=sse`, `?alt=%73se`, two
    values) that would bill the stream as the wrong format."""
    pairs = parse_qsl(qs, keep_blank_values=True)
    for k, v in pairs:
        if k in _RESHAPING and v:  # (empty, a mask asks for every field)
            message = f"{k}= is not served by the gateway on a metered call: the response must keep its usage"
            raise InvalidRequest(message)
    alts = {v.partition(";")[0] for k, v in pairs if k in ("alt", "$alt")}
    if not alts or alts == {"json"}:
        return False
    if stream and alts == {"sse"}:
        return True
    got = ", ".join(sorted(alts))
    raise InvalidRequest(f"alt={got} is not served by the gateway: use alt=sse (streams) or JSON")


class GeminiProvider:
    name = "gemini"
    meters: tuple[str, ...] = GEMINI_METERS

    def __init__(
        self,
        upstream: str,
        api_key: str,
        default_max_output: int,
        images_per_request: int,
        document_input_tokens: int = 2_097_152,
        server_tool_input_tokens: int = 2_097_152,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self._credential = ("x-goog-api-key", api_key)
        self._default_max_output = default_max_output
        self._images_per_request = images_per_request
        self._document_input = document_input_tokens  # reserved once for a request's files, audio, video, PDFs
        self._server_tool_input = server_tool_input_tokens  # reserved once for what server tools feed back

    def match(self, method: str, path: str, query: bytes) -> Route | None:
        qs, _ = _strip_key(query)
        upstream_path = path + ("?" + qs if qs else "")
        if method == "POST":
            m = _METHOD_RE.match(path)
            if m is None or m.group(4) not in _OPERATIONS:
                return None
            operation, metered = _OPERATIONS[m.group(4)]
            stream = operation == "stream_generate"
            model = check_model(m.group(3))
            sse = bool(qs) and metered and _metered_answer_is_sse(qs, stream)
            return Route(operation, upstream_path, model, metered=metered, has_body=True, stream=stream, sse=sse)
        if method == "GET":
            m = _MODELS_RE.match(path)
            if m is not None:
                model = check_model(m.group(2)) if m.group(2) is not None else ""
                return Route("models", upstream_path, model, metered=False, has_body=False)
        return None

    def extract_key(self, headers: Headers, query: bytes) -> str | None:
        for name, value in headers:  # names arrive lowercased (see providers.base)
            if name == b"x-goog-api-key":
                return value.decode("latin-1")
        _, key = _strip_key(query)
        if key is not None:
            return key
        for name, value in headers:  # REST callers sometimes send a bearer token
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return value[7:].decode("latin-1").strip()
        return None

    def upstream_headers(self, headers: Headers) -> list[tuple[str, str]]:
        return forward_headers(headers, self._credential)

    def prepare(self, route: Route, body: bytes, obj: Any) -> Call:
        reservation: dict[str, int]
        if route.operation == "predict":
            n = 1
            if isinstance(obj, dict):
                params = obj.get("parameters") or {}
                raw = params.get("sampleCount", params.get("sample_count", 4)) if isinstance(params, dict) else 4
                n = raw if type(raw) is int and raw > 0 else 4  # (a bool is no count: `true` would be journaled)
            return Call(route, route.model, False, {GEMINI_IMAGES: n}, 0, None, usage_from_predict)
        # Images, audio, video and PDFs cost what their pixels, seconds and pages hold, not their size in the
        # body (or nothing of it, by `fileData`): see `gemini_media`.
        media = gemini_media(obj)
        rate_in = media.input_tokens(body, GEMINI_IMAGE_MAX_TOKENS)
        is_object = isinstance(obj, dict)
        tools = obj.get("tools") if is_object else None
        # (the rate limit is no bill: documents and server tools' results count there by what they used, as
        # for Claude; a plain request skips the calls)
        est_in = rate_in
        if media.documents or tools:
            offers = offers_gemini_server_tools(tools)
            est_in += input_ceiling(media.documents, self._document_input, self._server_tool_input, offers)
        if not is_object:
            max_out, n, images = None, 1, False
        elif obj.get("generationConfig") or obj.get("generation_config"):
            max_out = requested_max_output(obj, "gemini")
            n = requested_candidates(obj)
            images = wants_images(obj, route.model)
        else:  # no generation config (most requests): no cap, one candidate, images by the model alone
            max_out, n, images = None, 1, image_model(route.model)
        est_out = max_out if max_out is not None else self._default_max_output
        if n > 1:
            est_out *= n  # the cap is per candidate
        reservation = {GEMINI_INPUT: est_in, GEMINI_CACHED: est_in, GEMINI_OUTPUT: est_out}
        if is_object and ("cachedContent" in obj or "cached_content" in obj):
            # A cache by name: its tokens (billed as cached input) are not in the body; the context
            # window, which no prompt exceeds, bounds them.
            reservation[GEMINI_CACHED] = max(est_in, self._document_input)
        if images:
            reservation[GEMINI_IMAGES] = self._images_per_request
        factory: Callable[[], StreamMeter] | None = None
        if route.stream:
            factory = GeminiSSEMeter if route.sse else GeminiArrayMeter
            if n > 1:  # the stream ends only once every candidate has finished
                factory = functools.partial(factory, n)
        return Call(route, route.model, route.stream, reservation, rate_in + est_out, factory, usage_from_response)

    def error_body(self, status: int, kind: str, message: str, extra: dict[str, Any] | None = None) -> bytes:
        error: dict[str, Any] = {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}
        if extra:
            error.update(extra)
        return orjson.dumps({"error": error})

    def stream_error_event(self, route: Route, status: int, kind: str, message: str) -> bytes:
        if not route.sse:
            return b""  # a JSON-array stream cannot take an event after it started; it just ends
        return b"data: " + self.error_body(status, kind, message) + b"\r\n\r\n"
