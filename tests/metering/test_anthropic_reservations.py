"""What an Anthropic request reserves beyond its body: tools, images, documents, a float max_tokens."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from gateway.metering.estimate import NO_MEDIA, claude_media, estimate_input_tokens
from gateway.meters import CLAUDE_CACHE_READ, CLAUDE_CACHE_WRITE, CLAUDE_INPUT, CLAUDE_OUTPUT
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import Route
from gateway.settings import ConfigError, parse_file_config
from tests.metering._images import solid_png

ROUTE = Route("messages", "/v1/messages", "", metered=True, has_body=True)
HI = [{"role": "user", "content": "hi"}]
IMAGE = 4784  # the most one image costs: 4,784 visual tokens (Claude 4.7 and later; 1,568 before)
DOCS = 250_000  # `[reservation] document_input_tokens` in these tests (the default is 1,000,000)


def reserve(obj: dict[str, object]) -> tuple[dict[str, int], int]:
    """The reservation, and the input estimate of the body alone."""
    body = orjson.dumps(obj)
    call = AnthropicProvider("http://x", "k", 4096, DOCS).prepare(ROUTE, body, orjson.loads(body))
    return call.reservation, estimate_input_tokens(body)


def test_an_integral_float_max_tokens_is_reserved_as_the_cap() -> None:
    # JSON `64000.0` (Python's json.dumps of a float) is the same cap; the 4096 default under-reserved.
    r, _ = reserve({"model": "claude-sonnet-4-6", "max_tokens": 64000.0, "messages": HI})
    assert r[CLAUDE_OUTPUT] == 64000
    r, _ = reserve({"model": "claude-sonnet-4-6", "max_tokens": 1e20, "messages": HI})
    assert r[CLAUDE_OUTPUT] == 4096  # past 2**53: not a cap the provider takes


def test_tools_reserve_the_tool_use_prompt_and_built_in_definitions() -> None:
    # The tool-use system prompt (~350 tokens) whenever `tools` is set; a built-in tool's definition
    # (the text editor's: 700) is not in the body; a custom tool's is, and counts with it.
    built_in = {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}
    custom = {"name": "get_weather", "input_schema": {"type": "object"}}
    r, body = reserve({"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": HI, "tools": [built_in, custom]})
    assert r[CLAUDE_INPUT] == body + 1024 + 1024
    r, body = reserve({"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": HI, "tools": [custom]})
    assert r[CLAUDE_INPUT] == body + 1024
    r, body = reserve({"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": HI})
    assert r[CLAUDE_INPUT] == body


def image(source: dict[str, Any]) -> dict[str, Any]:
    return {"type": "image", "source": source}


def document(source: dict[str, Any]) -> dict[str, Any]:
    return {"type": "document", "source": source}


def ask(*blocks: dict[str, Any]) -> dict[str, Any]:
    content = [*blocks, {"type": "text", "text": "What is in it?"}]
    return {"model": "claude-opus-4-7", "max_tokens": 16, "messages": [{"role": "user", "content": content}]}


BY_URL = {"type": "url", "url": "https://example.com/cat.jpg"}
BY_FILE = {"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}
PDF_BY_URL = {"type": "url", "url": "https://example.com/report.pdf"}


def test_an_image_by_url_or_file_reserves_the_most_an_image_costs() -> None:
    # The body holds a URL or an id, a few dozen tokens by size; the image behind it, up to 4,784.
    for source in (BY_URL, BY_FILE):
        r, body = reserve(ask(image(source)))
        assert r[CLAUDE_INPUT] == body + 4784
        assert r[CLAUDE_CACHE_WRITE] == r[CLAUDE_CACHE_READ] == r[CLAUDE_INPUT]


def test_a_base64_image_reserves_by_its_pixels_not_its_bytes() -> None:
    # 2576x1456 px (92 * 52 = 4,784 visual tokens) in 535 bytes of PNG, 716 of base64: its bytes / 2 said 358.
    data = base64.b64encode(solid_png(2576, 1456)).decode()
    assert len(data) == 716
    r, body = reserve(ask(image({"type": "base64", "media_type": "image/png", "data": data})))
    assert r[CLAUDE_INPUT] == body - 358 + 4784
    # And a large photo no longer reserves its megabytes: 400,000 base64 characters, at most 4,784 tokens.
    big = "A" * 400_000
    r, body = reserve(ask(image({"type": "base64", "media_type": "image/jpeg", "data": big})))
    assert r[CLAUDE_INPUT] == body - 200_000 + 4784


def test_a_document_by_url_or_file_reserves_the_document_ceiling() -> None:
    for source in (PDF_BY_URL, BY_FILE):
        r, body = reserve(ask(document(source)))
        assert r[CLAUDE_INPUT] == body + DOCS


def test_the_rate_limit_counts_a_document_by_what_it_uses_not_its_ceiling() -> None:
    # A ceiling on tokens per minute would refuse every document while anything else is in the window;
    # the rate limit is corrected to the actual usage when the request ends.
    body = orjson.dumps(ask(image(BY_URL), document(PDF_BY_URL)))
    call = AnthropicProvider("http://x", "k", 4096, DOCS).prepare(ROUTE, body, orjson.loads(body))
    assert call.reservation[CLAUDE_INPUT] == estimate_input_tokens(body) + IMAGE + DOCS
    assert call.rate_tokens == estimate_input_tokens(body) + IMAGE + 16


def test_a_base64_pdf_reserves_the_ceiling_instead_of_its_bytes() -> None:
    # A page costs its text plus an image, and pages can share one content stream: bytes bound nothing.
    data = base64.b64encode(b"%PDF-1.7 " + b"x" * 3000).decode()
    r, body = reserve(ask(document({"type": "base64", "media_type": "application/pdf", "data": data})))
    assert r[CLAUDE_INPUT] == body - len(data) // 2 + DOCS


def test_a_text_document_is_in_the_body_and_a_content_document_counts_its_images() -> None:
    text = {"type": "text", "media_type": "text/plain", "data": "The grass is green."}
    r, body = reserve(ask(document(text)))
    assert r[CLAUDE_INPUT] == body
    content = {"type": "content", "content": [{"type": "text", "text": "A chart:"}, image(BY_URL)]}
    r, body = reserve(ask(document(content)))
    assert r[CLAUDE_INPUT] == body + 4784


def test_several_images_and_documents() -> None:
    # Each image its maximum; the documents share the request's context window: the ceiling once.
    data = base64.b64encode(solid_png(1568, 1568)).decode()
    blocks = [
        image(BY_URL),
        image(BY_FILE),
        image({"type": "base64", "media_type": "image/png", "data": data}),
        document(PDF_BY_URL),
        document(BY_FILE),
    ]
    r, body = reserve(ask(*blocks))
    assert r[CLAUDE_INPUT] == body - len(data) // 2 + 3 * 4784 + DOCS


def test_images_and_documents_nested_in_a_tool_result() -> None:
    messages = [
        {"role": "user", "content": "Take a screenshot and fetch the spec."},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_01", "name": "screenshot", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01",
                    "content": [{"type": "text", "text": "done"}, image(BY_FILE), document(PDF_BY_URL)],
                }
            ],
        },
    ]
    r, body = reserve({"model": "claude-opus-4-7", "max_tokens": 16, "messages": messages})
    assert r[CLAUDE_INPUT] == body + 4784 + DOCS


def test_a_tool_use_input_is_data_not_content() -> None:
    # Arguments Claude passed to a tool are text to it, whatever their shape.
    call = {"type": "tool_use", "id": "toolu_01", "name": "store", "input": {"doc": document(PDF_BY_URL)}}
    messages = [*HI, {"role": "assistant", "content": [call]}]
    r, body = reserve({"model": "claude-opus-4-7", "max_tokens": 16, "messages": messages})
    assert r[CLAUDE_INPUT] == body


def test_an_escaped_type_is_still_counted() -> None:
    # `"\u0069mage"` is `"image"` to any JSON parser, so to the provider too.
    block = b'{"type":"\\u0069mage","source":{"type":"url","url":"https://example.com/a.png"}}'
    body = b'{"model":"claude-opus-4-7","max_tokens":16,"messages":[{"role":"user","content":[' + block + b"]}]}"
    call = AnthropicProvider("http://x", "k", 4096, DOCS).prepare(ROUTE, body, orjson.loads(body))
    assert call.reservation[CLAUDE_INPUT] == estimate_input_tokens(body) + 4784


def test_a_plain_text_request_is_unchanged() -> None:
    r, body = reserve({"model": "claude-opus-4-7", "max_tokens": 16, "messages": HI, "system": "Be brief."})
    assert r[CLAUDE_INPUT] == body
    # String contents and text blocks (citations and all) are passed over: nothing to count, nothing built.
    cited = {"type": "text", "text": "See", "citations": [{"type": "char_location", "document_index": 0}]}
    messages = [*HI, {"role": "assistant", "content": [cited]}, {"role": "user", "content": [cited, cited]}]
    assert claude_media({"messages": messages}) is NO_MEDIA
    r, body = reserve({"model": "claude-opus-4-7", "max_tokens": 16, "messages": messages})
    assert r[CLAUDE_INPUT] == body


def test_the_document_ceiling_setting() -> None:
    assert parse_file_config({}).reservation.document_input_tokens == 1_000_000
    assert (
        parse_file_config({"reservation": {"document_input_tokens": 200_000}}).reservation.document_input_tokens
        == 200_000
    )
    with pytest.raises(ConfigError, match="document_input_tokens must be at least 1"):
        parse_file_config({"reservation": {"document_input_tokens": 0}})
    with pytest.raises(ConfigError, match="document_input_tokens must be a non-negative integer"):
        parse_file_config({"reservation": {"document_input_tokens": "1M"}})


def test_a_continued_thread_reserves_the_input_ceilings() -> None:
    # `thread: continue` resumes server-held conversation state: the new turn is all the body holds, but
    # the provider bills the whole conversation as input, and takes the `system` and `tools` (server tools
    # among them) the thread was created with: the larger of the document and server tool ceilings.
    thread = {"type": "continue", "previous_message_id": "msg_01PreviousTurn"}
    body = orjson.dumps({"model": "claude-opus-4-7", "max_tokens": 16, "messages": HI, "thread": thread})
    for docs, server_tools in ((DOCS, 1_000_000), (DOCS, 100_000)):
        provider = AnthropicProvider("http://x", "k", 4096, docs, server_tool_input_tokens=server_tools)
        call = provider.prepare(ROUTE, body, orjson.loads(body))
        assert call.reservation[CLAUDE_INPUT] == estimate_input_tokens(body) + max(docs, server_tools)
        assert call.reservation[CLAUDE_CACHE_READ] == estimate_input_tokens(body) + max(docs, server_tools)
        # The rate limit counts it by what it used, as for documents and server tools.
        assert call.rate_tokens == estimate_input_tokens(body) + 16
    # One context window: documents in the new turn share the one ceiling.
    messages = ask(document(BY_FILE))["messages"]
    r, body_est = reserve({"model": "claude-opus-4-7", "max_tokens": 16, "messages": messages, "thread": thread})
    assert r[CLAUDE_INPUT] == body_est + 1_000_000
    # An unknown kind of thread is held state too (the safe side); `create` only starts holding it.
    r, body_est = reserve({"model": "claude-opus-4-7", "max_tokens": 16, "messages": HI, "thread": {"type": "fork"}})
    assert r[CLAUDE_INPUT] == body_est + 1_000_000
    for plain in ({"type": "create"}, None):
        r, body_est = reserve({"model": "claude-opus-4-7", "max_tokens": 16, "messages": HI, "thread": plain})
        assert r[CLAUDE_INPUT] == body_est


def test_server_side_fallbacks_reserve_every_attempt() -> None:
    # With `fallbacks`, a declined attempt (billed for what it read and wrote) is retried on each fallback
    # model in turn: each reads the whole input again and writes up to its entry's `max_tokens`, which may
    # exceed the request's (the request's when the entry sets none; "default": Anthropic's one model).
    base: dict[str, Any] = {"model": "claude-fable-5", "max_tokens": 16, "messages": HI}
    cases = [
        ([{"model": "claude-opus-4-8", "max_tokens": 64000}], 2, 16 + 64000),
        ([{"model": "claude-opus-4-8", "max_tokens": 64000}, {"model": "claude-opus-4-7"}], 3, 16 + 64000 + 16),
        ([{"model": "claude-opus-4-8", "max_tokens": None}], 2, 32),
        ("default", 2, 32),
    ]
    for fallbacks, attempts, output in cases:
        body = orjson.dumps({**base, "fallbacks": fallbacks})
        call = AnthropicProvider("http://x", "k", 4096, DOCS).prepare(ROUTE, body, orjson.loads(body))
        assert call.reservation[CLAUDE_OUTPUT] == output, fallbacks
        assert call.reservation[CLAUDE_INPUT] == attempts * estimate_input_tokens(body), fallbacks
        assert call.rate_tokens == attempts * estimate_input_tokens(body) + output, fallbacks
    for none in ([], None):
        r, body_est = reserve({**base, "fallbacks": none})
        assert (r[CLAUDE_INPUT], r[CLAUDE_OUTPUT]) == (body_est, 16)
