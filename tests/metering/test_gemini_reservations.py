"""What a Gemini request reserves beyond its body: inline images, files, audio, video, PDFs, server tools."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from gateway.metering.estimate import NO_MEDIA, estimate_input_tokens, gemini_media
from gateway.meters import GEMINI_CACHED, GEMINI_INPUT, GEMINI_OUTPUT
from gateway.providers.base import Call
from gateway.providers.gemini import GeminiProvider
from gateway.settings import ConfigError, parse_file_config
from tests.metering._images import solid_png

PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
IMAGE = 4128  # the most one image costs: 4 x 4 tiles of 258 (Gemini 2.x); 2,240 at most on Gemini 3
DOCS = 300_000  # `[reservation] gemini_document_input_tokens` in these tests (the default is 2,097,152)
TOOLS = 400_000  # `[reservation] gemini_server_tool_input_tokens` in these tests (the default is 2,097,152)
VIDEO = {"fileData": {"mimeType": "video/mp4", "fileUri": "https://generativelanguage.googleapis.com/v1beta/files/abc"}}
PDF = {"fileData": {"mimeType": "application/pdf", "fileUri": "https://example.com/report.pdf"}}
YOUTUBE = {"file_data": {"file_uri": "https://www.youtube.com/watch?v=9hE5-98ZeCg"}}


def prepare(obj: dict[str, Any], *, body: bytes | None = None, docs: int = DOCS, tools: int = TOOLS) -> Call:
    provider = GeminiProvider("http://x", "k", 4096, 4, docs, tools)
    route = provider.match("POST", PATH, b"")
    assert route is not None
    raw = orjson.dumps(obj) if body is None else body
    return provider.prepare(route, raw, orjson.loads(raw))


def reserve(obj: dict[str, Any], **ceilings: int) -> tuple[int, int]:
    """The input reservation, and the input estimate of the body alone."""
    call = prepare(obj, **ceilings)
    assert call.reservation[GEMINI_CACHED] == call.reservation[GEMINI_INPUT]
    return call.reservation[GEMINI_INPUT], estimate_input_tokens(orjson.dumps(obj))


def ask(*parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [*parts, {"text": "What is in it?"}]}], **extra}


def inline(mime: str, data: str, *, snake: bool = False) -> dict[str, Any]:
    if snake:
        return {"inline_data": {"mime_type": mime, "data": data}}
    return {"inlineData": {"mimeType": mime, "data": data}}


def test_a_tiny_inline_image_of_many_pixels_reserves_the_most_an_image_costs() -> None:
    # 3072x3072 px (16 tiles of 258 = 4,128 tokens) in 1.2 kB of PNG, 1,636 base64 characters: bytes / 2
    # said 818. Even a 1x1 image costs 258, more than its 92 characters / 2.
    data = base64.b64encode(solid_png(3072, 3072)).decode()
    assert len(data) == 1636
    r, body = reserve(ask(inline("image/png", data)))
    assert r == body - 818 + 4128
    dot = base64.b64encode(solid_png(1, 1)).decode()
    assert len(dot) == 92
    r, body = reserve(ask(inline("image/png", dot)))
    assert r == body - 46 + 4128
    # A large photo no longer reserves its megabytes: 400,000 base64 characters, at most 4,128 tokens.
    r, body = reserve(ask(inline("image/jpeg", "A" * 400_000)))
    assert r == body - 200_000 + 4128


def test_a_file_by_uri_reserves_the_document_ceiling() -> None:
    # An hour of video is ~950,000 tokens (263 a second), a PDF 258 a page: the body holds a URI.
    for part in (VIDEO, PDF, YOUTUBE):
        r, body = reserve(ask(part))
        assert r == body + DOCS


def test_inline_audio_video_and_pdf_reserve_the_ceiling_instead_of_their_bytes() -> None:
    # Audio costs 32 tokens a second, video 263, a PDF page 258: silence, a still picture or pages that
    # share one content stream take almost no bytes.
    for mime in ("audio/flac", "audio/ogg", "video/mp4", "application/pdf", "application/octet-stream"):
        data = base64.b64encode(b"\x00" * 3000).decode()
        r, body = reserve(ask(inline(mime, data)))
        assert r == body - 2000 + DOCS, mime


def test_inline_text_counts_by_size() -> None:
    data = base64.b64encode(b"name,colour\nsky,blue\ngrass,green\n" * 10).decode()
    for mime in ("text/plain", "text/csv; charset=utf-8", "application/json"):
        r, body = reserve(ask(inline(mime, data)))
        assert r == body, mime


SERVER_TOOLS = [
    {"urlContext": {}},  # the pages it reads (up to 20 URLs of up to 34 MB); the body holds their URLs
    {"url_context": {}},
    {"googleSearch": {}},  # the search results it grounds on (the per-query fee is apart, unmetered)
    {"google_search": {}},
    {"googleSearchRetrieval": {"dynamicRetrievalConfig": {"mode": "MODE_DYNAMIC"}}},
    {"codeExecution": {}},  # the code's output
    {"code_execution": {}},
    {"fileSearch": {"fileSearchStoreNames": ["fileSearchStores/manuals"]}},
    {"googleMaps": {}},
    {"enterpriseWebSearch": {}},
    {"someFutureTool": {}},  # unknown: the safe side
    {"functionDeclarations": [{"name": "f"}], "googleSearch": {}},  # one entry, both kinds
]
CLIENT_TOOLS = [
    {"functionDeclarations": [{"name": "get_weather"}]},  # the client runs them: results come in a later body
    {"function_declarations": [{"name": "get_weather"}]},
    {"computerUse": {"environment": "ENVIRONMENT_BROWSER"}},
    {"computer_use": {"environment": "ENVIRONMENT_BROWSER"}},
    {"googleSearch": None},  # null: not set (proto JSON)
    {},
]


@pytest.mark.parametrize("tool", SERVER_TOOLS, ids=lambda t: ",".join(t))
def test_a_server_tool_reserves_the_server_tool_ceiling(tool: dict[str, Any]) -> None:
    # What it feeds back is billed as input (`toolUsePromptTokenCount`), bounded only by the context window.
    r, body = reserve(ask(tools=[tool]))
    assert r == body + TOOLS
    r, body = reserve(ask(tools=[*CLIENT_TOOLS, tool]))
    assert r == body + TOOLS


@pytest.mark.parametrize("tools", [[], *([t] for t in CLIENT_TOOLS), CLIENT_TOOLS, "junk", [None, 3]])
def test_client_tools_reserve_nothing_beyond_the_body(tools: object) -> None:
    r, body = reserve(ask(tools=tools))
    assert r == body


def test_documents_and_server_tools_share_one_ceiling_the_larger() -> None:
    # Files and tool results fill the same context window: the larger applicable ceiling, once.
    obj = ask(VIDEO, PDF, tools=[{"googleSearch": {}}, {"urlContext": {}}, {"codeExecution": {}}])
    r, body = reserve(obj)
    assert r == body + TOOLS  # 400,000 > 300,000
    r, body = reserve(obj, docs=500_000)
    assert r == body + 500_000
    r, body = reserve(ask(VIDEO), docs=500_000)  # a document alone: its own ceiling, whatever the tools'
    assert r == body + 500_000
    r, body = reserve(ask(tools=[{"googleSearch": {}}]), docs=500_000)
    assert r == body + TOOLS


def test_the_rate_limit_counts_server_tools_by_use_not_the_ceiling() -> None:
    obj = ask(VIDEO, tools=[{"googleSearch": {}}], generationConfig={"maxOutputTokens": 64})
    call = prepare(obj)
    body = estimate_input_tokens(orjson.dumps(obj))
    assert call.reservation[GEMINI_INPUT] == call.reservation[GEMINI_CACHED] == body + TOOLS
    assert call.rate_tokens == body + 64


def test_a_cached_content_with_a_server_tool() -> None:
    # Cached input may be the whole input: the tool's ceiling counts on it as on gemini_input_tokens.
    obj = ask(cachedContent="cachedContents/x", tools=[{"google_search": {}}])
    call = prepare(obj)
    body = estimate_input_tokens(orjson.dumps(obj))
    assert (call.reservation[GEMINI_INPUT], call.reservation[GEMINI_CACHED]) == (body + TOOLS, body + TOOLS)
    call = prepare(obj, docs=500_000)
    assert (call.reservation[GEMINI_INPUT], call.reservation[GEMINI_CACHED]) == (body + TOOLS, 500_000)


def test_several_parts_both_casings() -> None:
    # Each image its maximum; the documents share the request's context window: the ceiling once.
    png = base64.b64encode(solid_png(1536, 1536)).decode()
    audio = base64.b64encode(b"fLaC" + b"\x00" * 600).decode()
    parts = [
        inline("image/png", png),
        inline("image/webp", png, snake=True),
        inline("audio/flac", audio, snake=True),
        VIDEO,
        YOUTUBE,
    ]
    obj = ask(*parts)
    assert gemini_media(obj).images == 2 and gemini_media(obj).documents == 3
    r, body = reserve(obj)
    assert r == body - (2 * len(png) + len(audio)) // 2 + 2 * 4128 + DOCS


def test_media_in_earlier_turns_the_system_instruction_and_function_responses() -> None:
    png = base64.b64encode(solid_png(800, 600)).decode()
    reply = {"functionResponse": {"name": "screenshot", "response": {"ok": True}, "parts": [inline("image/png", png)]}}
    obj = {
        "systemInstruction": {"parts": [{"text": "Be brief."}, PDF]},
        "contents": [
            {"role": "user", "parts": [{"text": "Take a screenshot."}]},
            {"role": "model", "parts": [{"functionCall": {"name": "screenshot", "args": {"file": VIDEO}}}]},
            {"role": "user", "parts": [reply]},
        ],
    }
    r, body = reserve(obj)
    # The call's `args` are data, not content: VIDEO there is text to the model.
    assert r == body - len(png) // 2 + 4128 + DOCS


def test_a_plain_text_request_is_unchanged() -> None:
    obj = {
        "systemInstruction": {"parts": [{"text": "Be brief."}], "role": "user"},
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}]},
            {"role": "model", "parts": [{"text": "Hello!", "thoughtSignature": "c2ln"}]},
            {"role": "user", "parts": [{"text": "And now?"}]},
        ],
        "tools": [{"functionDeclarations": [{"name": "f"}]}],  # (a server tool would reserve its ceiling)
        "generationConfig": {"maxOutputTokens": 100},
    }
    assert gemini_media(obj) is NO_MEDIA
    call = prepare(obj)
    body = estimate_input_tokens(orjson.dumps(obj))
    assert call.reservation == {GEMINI_INPUT: body, GEMINI_CACHED: body, GEMINI_OUTPUT: 100}
    assert call.rate_tokens == body + 100


def test_the_rate_limit_counts_a_document_by_what_it_uses_not_its_ceiling() -> None:
    # A ceiling on tokens per minute would refuse every file while anything else is in the window; the
    # rate limit is corrected to the actual usage when the request ends. Images count at their most.
    png = base64.b64encode(solid_png(3072, 3072)).decode()
    obj = ask(inline("image/png", png), PDF, generationConfig={"maxOutputTokens": 64})
    call = prepare(obj)
    text = estimate_input_tokens(orjson.dumps(obj)) - len(png) // 2
    assert call.reservation[GEMINI_INPUT] == text + IMAGE + DOCS
    assert call.rate_tokens == text + IMAGE + 64


def test_an_escaped_key_is_still_counted() -> None:
    # `"f\u0069leData"` is `"fileData"` to any JSON parser, so to the provider too.
    part = b'{"f\\u0069leData":{"mimeType":"video/mp4","fileUri":"https://example.com/v.mp4"}}'
    body = b'{"contents":[{"parts":[' + part + b',{"text":"Describe it."}]}]}'
    call = prepare({}, body=body)
    assert call.reservation[GEMINI_INPUT] == estimate_input_tokens(body) + DOCS


@pytest.mark.parametrize(
    ("name", "claude_name", "default"),
    [
        ("gemini_document_input_tokens", "document_input_tokens", 2_097_152),
        ("gemini_server_tool_input_tokens", "server_tool_input_tokens", 2_097_152),
    ],
)
def test_the_gemini_ceiling_settings(name: str, claude_name: str, default: int) -> None:
    reservation = parse_file_config({}).reservation
    assert getattr(reservation, name) == default
    assert getattr(reservation, claude_name) == 1_000_000  # Claude's, apart
    assert getattr(parse_file_config({"reservation": {name: 200_000}}).reservation, name) == 200_000
    with pytest.raises(ConfigError, match=f"{name} must be at least 1"):
        parse_file_config({"reservation": {name: 0}})
    with pytest.raises(ConfigError, match=f"{name} must be a non-negative integer"):
        parse_file_config({"reservation": {name: "2M"}})
    # The provider's default is the setting's.
    obj = ask(tools=[{"googleSearch": {}}])
    raw_body = orjson.dumps(obj)
    provider = GeminiProvider("http://x", "k", 4096, 4)
    route = provider.match("POST", PATH, b"")
    assert route is not None
    call = provider.prepare(route, raw_body, obj)
    assert call.reservation[GEMINI_INPUT] == estimate_input_tokens(raw_body) + 2_097_152


def test_a_cached_content_reserves_the_ceiling_as_cached_input() -> None:
    # The cache's tokens are billed as cached input and are not in the body; the window bounds them.
    for field in ("cachedContent", "cached_content"):
        obj = ask(**{field: "cachedContents/lecture-notes"})
        call = prepare(obj)
        body = estimate_input_tokens(orjson.dumps(obj))
        assert (call.reservation[GEMINI_INPUT], call.reservation[GEMINI_CACHED]) == (body, DOCS)
        assert call.rate_tokens == body + 4096  # the rate limit counts the cache by use, as documents
    big = ask(**{"cachedContent": "cachedContents/x"})
    big["contents"][0]["parts"][0]["text"] = "x" * (2 * DOCS + 2000)  # a body beyond the ceiling bounds itself
    call = prepare(big)
    assert call.reservation[GEMINI_CACHED] == call.reservation[GEMINI_INPUT] > DOCS


def test_the_gemini_output_default_is_the_models_limit_apart_from_claudes() -> None:
    # Without maxOutputTokens Google lets the model write up to 65,536 tokens (Gemini 2.5 and 3, thinking
    # included); Claude requires max_tokens, so its default stays.
    reservation = parse_file_config({}).reservation
    assert (reservation.gemini_max_output_tokens, reservation.default_max_output_tokens) == (65_536, 4096)
    custom = parse_file_config({"reservation": {"gemini_max_output_tokens": 8192}}).reservation
    assert custom.gemini_max_output_tokens == 8192
    with pytest.raises(ConfigError, match="gemini_max_output_tokens must be a non-negative integer"):
        parse_file_config({"reservation": {"gemini_max_output_tokens": -1}})
