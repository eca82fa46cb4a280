"""Usage extraction for the Gemini API: generateContent, streamGenerateContent, Imagen predict.

Billing rules (Gemini's usageMetadata):
- `promptTokenCount` includes `cachedContentTokenCount`, so fresh input is prompt - cached,
  plus `toolUsePromptTokenCount` (tool results fed back in are input).
- `thoughtsTokenCount` is separate from `candidatesTokenCount` and billed as output.
- Image output is billed per image (`gemini_images`), so IMAGE-modality candidate tokens
  are taken out of the output token meter to avoid charging twice.
- Streams: `usageMetadata` holds running totals (last one wins, a chunk without it keeps
  the previous one); each image appears in exactly one chunk, so images are summed.

A streamed chunk is parsed at once only when its raw text names a field that does more than
update the totals (`_MATTERS`: finish, images, errors); a plain text chunk's totals are only
ever read if no later chunk replaces them, so it is kept unparsed (`_Accumulator.observe_chunk`)
and a long stream costs one parse at its end instead of one per chunk. Field names are matched
as the JSON text Google writes them (quoted, unescaped), as the Anthropic meter matches event
names.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.metering.estimate import is_image_modality
from gateway.metering.jsonarray import JSONArrayScanner
from gateway.metering.sse import SSEParser
from gateway.metering.usage import BINARY as _BINARY
from gateway.metering.usage import Usage, as_count
from gateway.meters import GEMINI_CACHED, GEMINI_IMAGES, GEMINI_INPUT, GEMINI_OUTPUT


def meters_from_metadata(um: dict[str, Any] | None, images: int = 0) -> dict[str, int]:
    """Map a `usageMetadata` object (plus an image count) to the four Gemini meters."""
    u = um or {}
    get = u.get
    # (an absent count is 0 as `as_count(None)` would make it, without the call)
    prompt, cached = get("promptTokenCount", 0), get("cachedContentTokenCount", 0)
    tool = get("toolUsePromptTokenCount", 0)
    output, thoughts = get("candidatesTokenCount", 0), get("thoughtsTokenCount", 0)
    # Plain non-negative ints (what the API sends) are their own counts: one check instead of five calls
    # (ints OR to a negative one exactly when one of them is negative).
    if not (
        type(prompt) is type(cached) is type(tool) is type(output) is type(thoughts) is int
        and prompt | cached | tool | output | thoughts >= 0
    ):
        prompt, cached, tool = as_count(prompt), as_count(cached), as_count(tool)
        output, thoughts = as_count(output), as_count(thoughts)
    output += thoughts
    details = get("candidatesTokensDetails")
    if isinstance(details, list):
        for d in details:
            if isinstance(d, dict) and is_image_modality(d.get("modality")):
                output -= as_count(d.get("tokenCount"))
    return {
        GEMINI_INPUT: (prompt - cached if prompt > cached else 0) + tool,
        GEMINI_CACHED: cached,
        GEMINI_OUTPUT: output if output > 0 else 0,
        GEMINI_IMAGES: images,
    }


def _is_image_part(part: object) -> bool:
    if not isinstance(part, dict) or part.get("thought") is True:
        return False  # thought parts are interim reasoning artefacts, not delivered images
    blob = part.get("inlineData")
    if blob is None:
        blob = part.get("inline_data")
    if not isinstance(blob, dict):
        return False
    mime = blob.get("mimeType")
    if mime is None:
        mime = blob.get("mime_type")
    return isinstance(mime, str) and mime.startswith("image/")


# A chunk whose text holds none of these can change nothing but the running totals. Each stands
# for one or two fields (`Reason"` ends "finishReason" and "blockReason", `"inline` starts
# "inlineData" and "inline_data"): another that matches them too only costs a parse.
_MATTERS = (b'Reason"', b'"inline', b'"error"')
_METADATA = b'"usageMetadata"'
# Unparsed chunks kept at most: the newest that parses is the one that counts, and a malformed
# chunk must not make an older one's totals disappear, so a few are kept, then settled.
MAX_DEFERRED = 32


class _Accumulator:
    """Shared semantics for one response, whether it arrives whole, as SSE or as an array."""

    __slots__ = ("_candidates", "_deferred", "_finished", "error", "final", "images", "metadata")

    def __init__(self, candidates: int = 1) -> None:
        self.metadata: dict[str, Any] | None = None
        self.images = 0
        self.final = False
        # The response ends when every candidate has its finishReason (by index: one said twice counts once).
        self._candidates = candidates
        self._finished: set[object] | None = set() if candidates > 1 else None
        self.error: Any = None
        self._deferred: list[bytes] = []  # chunks newer than `metadata` that may only replace it

    def observe(self, obj: object) -> None:
        if not isinstance(obj, dict):
            return
        if "error" in obj:
            self.error = obj["error"]
        um = obj.get("usageMetadata")
        if isinstance(um, dict):
            self.metadata = um  # running totals: the last one wins
        candidates = obj.get("candidates")
        if isinstance(candidates, list):
            for cand in candidates:
                if not isinstance(cand, dict):
                    continue
                if cand.get("finishReason"):
                    finished = self._finished
                    if finished is None:
                        self.final = True
                    else:
                        finished.add(cand.get("index", 0))
                        self.final = len(finished) >= self._candidates
                content = cand.get("content")
                parts = content.get("parts") if isinstance(content, dict) else None
                if isinstance(parts, list):
                    for part in parts:  # a plain loop, and no call for a part without a blob
                        if (
                            isinstance(part, dict)
                            and ("inlineData" in part or "inline_data" in part)
                            and _is_image_part(part)
                        ):
                            self.images += 1
        feedback = obj.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            self.final = True  # a blocked prompt gets no candidates and no finishReason

    def observe_chunk(self, data: bytes) -> None:
        """A streamed chunk (JSON text): the result of parsing and observing it, parsing only what can matter."""
        for needle in _MATTERS:
            if data.find(needle) >= 0:
                break
        else:
            if data.find(_METADATA) >= 0:  # totals only (or the word in a text): read if still newest
                self._deferred.append(data)
                if len(self._deferred) >= MAX_DEFERRED:
                    self._settle()
            return  # nothing this chunk holds changes the usage
        obj = _loads(data)  # None when malformed: observing it changes nothing
        self.observe(obj)
        if self._deferred and isinstance(obj, dict) and isinstance(obj.get("usageMetadata"), dict):
            self._deferred.clear()  # these totals are newer than any deferred ones

    def _settle(self) -> None:
        """Apply the newest deferred totals that parse: what observing each in turn would leave."""
        deferred = self._deferred
        while deferred:
            obj = _loads(deferred.pop())
            um = obj.get("usageMetadata") if isinstance(obj, dict) else None
            if isinstance(um, dict):
                self.metadata = um
                break
        deferred.clear()

    def usage(self) -> Usage:
        if self._deferred:
            self._settle()
        um = self.metadata
        return Usage(
            meters=meters_from_metadata(um, self.images),
            raw=um,
            final=self.final,
            error=self.error,
            seen=um is not None or self.images > 0,
        )


def _loads(body: bytes | dict[str, Any]) -> object:
    if isinstance(body, _BINARY):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
    return body


def usage_from_response(body: bytes | dict[str, Any]) -> Usage:
    """Usage of a complete generateContent body (an array body is read element by element)."""
    obj = _loads(body)
    acc = _Accumulator()
    if isinstance(obj, list):
        for item in obj:
            acc.observe(item)
    elif isinstance(obj, dict):
        acc.observe(obj)
    else:
        return acc.usage()
    acc.final = True  # the body is complete, whatever finishReason said
    return acc.usage()


def usage_from_predict(body: bytes | dict[str, Any]) -> Usage:
    """Usage of an Imagen :predict body: one billable image per delivered prediction.

    RAI-filtered entries (only `raiFilteredReason`) and safety-attribute entries carry no
    image and are not charged.
    """
    obj = _loads(body)
    if not isinstance(obj, dict):
        return Usage(meters=meters_from_metadata(None))
    error = obj.get("error")
    predictions = obj.get("predictions")
    if not isinstance(predictions, list):
        return Usage(meters=meters_from_metadata(None), final=True, error=error)
    n = sum(1 for p in predictions if isinstance(p, dict) and (p.get("bytesBase64Encoded") or p.get("gcsUri")))
    return Usage(
        meters=meters_from_metadata(None, n),
        raw={"predictions": n},
        final=True,
        error=error,
        seen=True,
    )


class GeminiSSEMeter:
    """Meters streamGenerateContent?alt=sse; every `data:` payload is one response chunk."""

    __slots__ = ("_acc", "sse")

    def __init__(self, candidates: int = 1) -> None:
        self.sse = SSEParser()
        self._acc = _Accumulator(candidates)

    def feed(self, chunk: bytes) -> None:
        # What Gemini writes per read: one `data:` line framed by CRLF CRLF. From an idle parser
        # that is one event and leaves the parser idle, as `SSEParser.feed` would find.
        end = len(chunk) - 4
        if (
            self.sse.idle
            and chunk.find(b"\r") == end
            and chunk.find(b"\n") == end + 1
            and chunk.endswith(b"\r\n\r\n")
            and chunk.startswith(b"data: ")
        ):
            if end > 6:
                self._acc.observe_chunk(chunk[6:end])
            return
        for _, data in self.sse.feed(chunk):
            if data:
                self._acc.observe_chunk(data)

    def usage(self) -> Usage:
        return self._acc.usage()


class GeminiArrayMeter:
    """Meters streamGenerateContent without alt=sse: one JSON array written incrementally."""

    __slots__ = ("_acc", "_scan")
    sse = None  # not SSE: a JSON array

    def __init__(self, candidates: int = 1) -> None:
        self._scan = JSONArrayScanner()
        self._acc = _Accumulator(candidates)

    def feed(self, chunk: bytes) -> None:
        for element in self._scan.feed(chunk):
            self._acc.observe_chunk(element)
        if self._scan.done:
            self._acc.final = True

    def usage(self) -> Usage:
        return self._acc.usage()
