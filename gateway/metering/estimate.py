"""Request-side estimates used to reserve quota before a request is forwarded.

The reservation is settled against the provider's reported usage afterwards, so these
only need to be cheap and on the high side: over-reserving briefly holds back quota,
under-reserving lets a user overspend with concurrent requests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any


def estimate_input_tokens(body: bytes) -> int:
    """Upper bound on the input tokens of a request body, without a tokenizer.

    Tokenizers average ~4 bytes per token on English and rarely go below ~2 bytes per
    token even for CJK or code once JSON framing (keys, quotes, escapes) is counted, so
    `len // 2` over-estimates nearly every real body; the +16 covers tiny bodies and the
    few tokens of per-message overhead the provider adds. Media is another matter: an
    image's cost follows its pixels, not its bytes (counted apart: see `claude_media` and
    `gemini_media`).
    """
    return len(body) // 2 + 16


# The most one Claude image costs, whatever its bytes. It costs ceil(width / 28) * ceil(height / 28) visual
# tokens, once downscaled to at most 4,784 of them (2576 px long edge) on Claude 4.7 and later, 1,568 on
# earlier models. A few hundred bytes of PNG can hold a 2576x1456 image: a byte count is no bound.
CLAUDE_IMAGE_MAX_TOKENS = 4784

_TOOL_USE_TYPES = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})


@dataclass(frozen=True, slots=True)
class Media:
    """A request's media, which cost input tokens its byte size does not bound (`claude_media`, `gemini_media`)."""

    images: int = 0  # each costs up to the provider's most for one image
    documents: int = 0  # media whose cost nothing in the body bounds (a PDF, a file by reference, audio, video)
    inline_bytes: int = 0  # base64 `data` of those: in the body, but reserved by the count instead

    def input_tokens(self, body: bytes, image_tokens: int) -> int:
        """Upper bound on the request's input but its documents: its text by size, base64 media left out
        of the size, plus `image_tokens` per image. Documents are one ceiling for the request (they share
        its context window), which the caller adds for the reservation and leaves out of the rate limit."""
        return estimate_input_tokens(body) - self.inline_bytes // 2 + self.images * image_tokens


NO_MEDIA = Media()


def claude_media(obj: Any) -> Media:
    """Count the images and documents in a Claude request's `messages`, at any depth (a `tool_result`'s
    content, a `content` document source).

    Cheap for plain requests: a string `content` and a `text` block are passed over without a look inside,
    so the work follows the number of blocks, never the bytes of their text. The `input` a tool use was
    called with is data, not content, and is not searched. Iterative: a deeply nested body cannot exhaust
    the stack.
    """
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list):
        return NO_MEDIA
    stack: list[Any] = []
    for message in messages:  # the common shapes in one tight loop: most requests end here
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for block in content:
                if not isinstance(block, dict) or block.get("type") != "text":
                    stack.append(block)
    if not stack:
        return NO_MEDIA
    images = documents = inline = 0
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        if kind == "text":
            continue  # text and its citations: counted by size
        if kind == "image" or kind == "document":
            source = node.get("source")
            if not isinstance(source, dict):
                source = {}  # invalid for the API; counted all the same, the safe side
            source_type = source.get("type")
            if kind == "document" and source_type == "text":
                continue  # plain text, in the body and counted with it
            if kind == "document" and source_type == "content":
                stack.append(source.get("content"))  # text and image blocks, walked like any content
                continue
            data = source.get("data") if source_type == "base64" else None
            if isinstance(data, str):
                inline += len(data)
            if kind == "image":
                images += 1
            else:
                documents += 1
            continue
        skip = "input" if kind in _TOOL_USE_TYPES else None
        for key, value in node.items():
            if key != skip and isinstance(value, (list, dict)):
                stack.append(value)
    if not (images or documents):
        return NO_MEDIA
    return Media(images, documents, inline)


def continues_thread(thread: object) -> bool:
    """Whether a Claude request's `thread` resumes server-held conversation state: any but `{"type": "create"}`
    (which only starts holding it), so an unknown kind counts. The body then holds only the new turn, while
    the provider bills the whole conversation as input, which only the context window bounds."""
    return thread is not None and not (isinstance(thread, dict) and thread.get("type") == "create")


# The most one Gemini image costs, whatever its bytes. Gemini 2.x bills 258 tokens for an image of at most
# 384x384 px, else 258 per 768x768 tile, once scaled down to fit 3072x3072: at most 4 x 4 tiles. Gemini 3
# bills by `mediaResolution`: at most 2,240 (ULTRA_HIGH). A 1-bit PNG of 3072x3072 px is 1.2 kB, and even a
# 1x1 image costs 258 tokens, more than its 92 base64 characters: a byte count is no bound.
GEMINI_IMAGE_MAX_TOKENS = 16 * 258

# Inline data Gemini reads as text: its tokens are bounded by its bytes like the body's (base64 makes them
# 4/3 as many), so it counts by size. Any other inline data (audio, video, PDF) costs by the second or the
# page, which its bytes do not bound (a silent FLAC, a still video, PDF pages sharing one content stream).
_TEXT_MIME_TYPES = frozenset(
    {"application/json", "application/xml", "application/javascript", "application/x-javascript"}
)


def _either(d: dict[str, Any], camel: str, snake: str) -> Any:
    value = d.get(camel)
    return d.get(snake) if value is None else value


def gemini_media(obj: Any) -> Media:
    """Count the inline images and the input the body does not hold in a Gemini request: parts of
    `contents` and `systemInstruction` (also those of a `functionResponse`). (Server tools, the URL
    context tool among them, are reserved apart: see `offers_gemini_server_tools`.)

    Both JSON casings are read (`inlineData` / `inline_data`, ...), as the API does. Cheap for plain
    requests: a part that is only `text` is passed over without a look inside, so the work follows the
    number of parts, never the bytes of their text. Iterative: nested function responses cannot exhaust
    the stack.
    """
    if not isinstance(obj, dict):
        return NO_MEDIA
    stack: list[Any] = []
    contents = obj.get("contents")
    if isinstance(contents, dict):
        contents = [contents]  # a single Content: the API takes a list, but the safe side is to count it
    elif not isinstance(contents, list):
        contents = ()
    for content in contents:
        parts = content.get("parts") if isinstance(content, dict) else None
        if isinstance(parts, list):
            for part in parts:  # the common shapes in one tight loop: most requests end here
                if isinstance(part, dict) and not (len(part) == 1 and "text" in part):
                    stack.append(part)
    if "systemInstruction" in obj or "system_instruction" in obj:
        system = _either(obj, "systemInstruction", "system_instruction")
        parts = system.get("parts") if isinstance(system, dict) else None
        if isinstance(parts, list):
            stack.extend(part for part in parts if isinstance(part, dict) and not (len(part) == 1 and "text" in part))
    if not stack:
        return NO_MEDIA
    images = documents = inline = 0
    while stack:
        part = stack.pop()
        if not isinstance(part, dict):
            continue
        if _either(part, "fileData", "file_data") is not None:
            documents += 1  # an upload, a URL, a video: nothing in the body says how long
            continue
        data = _either(part, "inlineData", "inline_data")
        if isinstance(data, dict):
            mime = _either(data, "mimeType", "mime_type")
            mime = mime.lower().partition(";")[0].strip() if isinstance(mime, str) else ""
            if mime.startswith("text/") or mime in _TEXT_MIME_TYPES:
                continue  # text: counted by size with the body
            payload = data.get("data")
            if isinstance(payload, str):
                inline += len(payload)
            if mime.startswith("image/"):
                images += 1
            else:
                documents += 1  # audio, video, PDF, or unknown: the safe side
            continue
        response = _either(part, "functionResponse", "function_response")
        if isinstance(response, dict):
            nested = response.get("parts")  # multimodal function responses carry parts of their own
            if isinstance(nested, list):
                stack.extend(nested)
    if not (images or documents):
        return NO_MEDIA
    return Media(images, documents, inline)


def _positive_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        if isinstance(value, float) and value.is_integer() and 0 <= value < 2**53:
            return int(value)  # `64000.0`: the same cap to the provider (only off the int path)
        return None
    return value


def _proto_int(value: object) -> int | None:
    """A Gemini int32 field as Google reads it: proto3 JSON takes a number or a decimal string ("3", "5e2"),
    integral. None when absent or not one (Google refuses such a request)."""
    if isinstance(value, str):
        try:
            value = int(value) if value.isdigit() else float(value)
        except ValueError:
            return None
    return _positive_int(value)


def _generation_config(body_obj: dict[str, Any]) -> dict[str, Any]:
    cfg = body_obj.get("generationConfig")
    if not isinstance(cfg, dict):
        cfg = body_obj.get("generation_config")
    return cfg if isinstance(cfg, dict) else {}


def requested_max_output(body_obj: dict[str, Any], provider: str) -> int | None:
    """The client's output cap: anthropic `max_tokens`, gemini `maxOutputTokens`.

    None when absent or not a non-negative int (the caller then uses its own default); for gemini
    also when 0, which Google may read as unset (the model's own limit). Unknown providers also give None.
    """
    if provider == "anthropic":
        return _positive_int(body_obj.get("max_tokens"))
    if provider == "gemini":
        cfg = _generation_config(body_obj)
        return _proto_int(_either(cfg, "maxOutputTokens", "max_output_tokens")) or None
    return None


def fallback_attempts(fallbacks: object, max_out: int) -> tuple[int, int]:
    """The attempts a Claude request with server-side `fallbacks` may run, and the output they may write
    together. A declined attempt is billed for what it read and wrote, then retried on each fallback model in
    turn: each attempt reads the whole input again and writes up to its entry's `max_tokens` (`max_out`, the
    request's, without one). `"default"` is the one fallback model Anthropic recommends; anything else that
    is not a list counts as one attempt more too (the safe side)."""
    if not isinstance(fallbacks, list):
        return 2, 2 * max_out
    output = max_out
    for entry in fallbacks:
        cap = _positive_int(entry.get("max_tokens")) if isinstance(entry, dict) else None
        output += max_out if cap is None else cap
    return 1 + len(fallbacks), output


def requested_candidates(body_obj: dict[str, Any]) -> int:
    """Gemini `candidateCount` (each candidate may use the whole output cap); 1 when absent or invalid."""
    cfg = _generation_config(body_obj)
    n = _proto_int(_either(cfg, "candidateCount", "candidate_count"))
    return n if n else 1


def wants_images(body_obj: dict[str, Any], path_model: str) -> bool:
    """Whether a Gemini request may produce billable images (so image quota is reserved).

    True when `responseModalities` asks for IMAGE or the model is an image model
    (`gemini-*-image*`, `imagen-*`); `path_model` may carry a `models/` prefix.
    """
    cfg = _generation_config(body_obj)
    modalities = _either(cfg, "responseModalities", "response_modalities")
    if isinstance(modalities, str):
        modalities = [modalities]  # invalid for the API, but reserving too much is the safe side
    if isinstance(modalities, list) and any(is_image_modality(m) for m in modalities):
        return True
    return image_model(path_model)


def is_image_modality(modality: object) -> bool:
    """A Gemini modality that is IMAGE: by name, or by number as Google's REST clients write enums
    (proto3 JSON, `$alt=json;enum-encoding=int`): Modality.IMAGE = 2 (a bool is no enum number)."""
    if isinstance(modality, str):
        return modality.upper() == "IMAGE"
    return modality == 2 and type(modality) is int


@functools.lru_cache(maxsize=256)  # a few models, asked about on every request
def image_model(path_model: str) -> bool:
    """Whether a Gemini model makes images whatever the request asks (`gemini-*-image*`, `imagen-*`)."""
    model = path_model.lower().rsplit("/", 1)[-1]
    return "image" in model or model.startswith("imagen")
