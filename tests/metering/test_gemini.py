"""Gemini usage: generateContent, SSE and JSON-array streams, Imagen predict."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.metering import (
    GeminiArrayMeter,
    GeminiSSEMeter,
    JSONArrayScanner,
    Usage,
    gemini,
    usage_from_predict,
    usage_from_response,
)
from gateway.metering.gemini import _Accumulator
from gateway.meters import GEMINI_CACHED, GEMINI_IMAGES, GEMINI_INPUT, GEMINI_OUTPUT

from ._split import assert_split_invariant, run

FIXTURES = Path(__file__).parent.parent / "fixtures"
UNAVAILABLE = {
    "code": 503,
    "message": "The model is overloaded. Please try again later.",
    "status": "UNAVAILABLE",
}


def meters(inp: int, cached: int, out: int, images: int) -> dict[str, int]:
    return {GEMINI_INPUT: inp, GEMINI_CACHED: cached, GEMINI_OUTPUT: out, GEMINI_IMAGES: images}


def read(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


# --- generateContent -------------------------------------------------------------------------


def test_generate_content() -> None:
    u = usage_from_response(read("gemini/generate_content.json"))
    assert u.meters == meters(8, 0, 9 + 285, 0)
    assert u.final and u.seen and u.error is None
    assert u.raw["totalTokenCount"] == 302


def test_generate_content_cached_tooluse() -> None:
    u = usage_from_response(read("gemini/generate_content_cached_tooluse.json"))
    assert u.meters == meters(40120 - 40000 + 350, 40000, 11 + 120, 0)
    assert u.meters == meters(470, 40000, 131, 0)


def test_image_generate_content() -> None:
    u = usage_from_response(read("gemini/image_generate_content.json"))
    assert u.meters == meters(7, 0, 1300 - 1290, 1)


def test_image_tokens_with_integer_enums_are_not_billed_twice() -> None:
    # Google REST clients ask for `$alt=json;enum-encoding=int`: every enum comes back as its number, the
    # modality too (IMAGE = 2, TEXT = 1). The image's 1,290 tokens were billed as output beside the image.
    body = orjson.loads(read("gemini/image_generate_content.json"))
    body["candidates"][0]["finishReason"] = 1  # STOP
    body["usageMetadata"]["promptTokensDetails"] = [{"modality": 1, "tokenCount": 7}]
    body["usageMetadata"]["candidatesTokensDetails"] = [
        {"modality": 2, "tokenCount": 1290},
        {"modality": 1, "tokenCount": 10},
    ]
    u = usage_from_response(orjson.dumps(body))
    assert (
        u.meters
        == meters(7, 0, 1300 - 1290, 1)
        == usage_from_response(read("gemini/image_generate_content.json")).meters
    )


def test_dict_input_matches_bytes() -> None:
    body = read("gemini/image_generate_content.json")
    assert usage_from_response(orjson.loads(body)) == usage_from_response(body)


@pytest.mark.parametrize("name", sorted(p.name for p in (FIXTURES / "gemini").glob("error_*.json")))
def test_error_bodies(name: str) -> None:
    body = read(f"gemini/{name}")
    u = usage_from_response(body)
    assert u.meters == meters(0, 0, 0, 0)
    assert not u.seen and u.raw is None
    assert u.error == orjson.loads(body)["error"]


def test_missing_fields_and_blocked_prompt() -> None:
    u = usage_from_response({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 5}})
    assert u.meters == meters(5, 0, 0, 0) and u.seen and u.final
    assert usage_from_response({}).meters == meters(0, 0, 0, 0)
    assert not usage_from_response(b"oops").seen


def part_image(mime: str = "image/png", *, snake: bool = False, thought: bool = False) -> dict[str, Any]:
    blob = {"mime_type": mime, "data": "AAAA"} if snake else {"mimeType": mime, "data": "AAAA"}
    part: dict[str, Any] = {"inline_data": blob} if snake else {"inlineData": blob}
    if thought:
        part["thought"] = True
    return part


def test_image_part_rules() -> None:
    parts = [
        part_image(),
        part_image("image/jpeg", snake=True),
        part_image(thought=True),
        part_image("audio/pcm"),
        {"text": "hi"},
        {"fileData": {"mimeType": "image/png", "fileUri": "gs://x"}},
        "junk",
    ]
    body = {
        "candidates": [
            {"content": {"parts": parts}, "finishReason": "STOP"},
            {"content": {"parts": [part_image()]}},
            {"content": None},
        ],
        "usageMetadata": {"candidatesTokenCount": 100, "candidatesTokensDetails": [{"modality": "TEXT"}]},
    }
    u = usage_from_response(body)
    assert u.meters[GEMINI_IMAGES] == 3
    assert u.meters[GEMINI_OUTPUT] == 100  # no IMAGE entry itemised: nothing subtracted


# --- Imagen predict --------------------------------------------------------------------------


def test_imagen_predict() -> None:
    u = usage_from_predict(read("gemini/imagen_predict.json"))
    assert u == Usage(meters=meters(0, 0, 0, 2), raw={"predictions": 2}, final=True, seen=True)


def test_imagen_predict_gcs_and_safety_entries() -> None:
    body = {
        "predictions": [
            {"gcsUri": "gs://bucket/a.png", "mimeType": "image/png"},
            {"bytesBase64Encoded": "AAAA", "safetyAttributes": {"categories": [], "scores": []}},
            {"contentType": "Positive Prompt", "safetyAttributes": {"categories": [], "scores": []}},
            {"raiFilteredReason": "filtered"},
            {"bytesBase64Encoded": ""},
        ]
    }
    assert usage_from_predict(body).meters == meters(0, 0, 0, 2)


def test_imagen_predict_error_and_garbage() -> None:
    body = read("gemini/error_429_resource_exhausted.json")
    u = usage_from_predict(body)
    assert u.meters == meters(0, 0, 0, 0) and not u.seen and u.error == orjson.loads(body)["error"]
    assert not usage_from_predict(b"<html>").seen


# --- SSE stream ------------------------------------------------------------------------------

TEXT_STREAM = meters(8, 0, 10 + 286, 0)


@pytest.mark.parametrize(
    "name",
    [
        "gemini/stream_generate_content.sse",
        "edge/gemini_stream_lf.sse",
        "edge/gemini_stream_data_nospace.sse",
    ],
)
def test_sse_text_stream(name: str) -> None:
    u = run(GeminiSSEMeter, [read(name)])
    assert u.meters == TEXT_STREAM
    assert u.final and u.seen and u.error is None
    assert u.raw["candidatesTokenCount"] == 10 and u.raw["totalTokenCount"] == 304


def test_sse_image_stream() -> None:
    u = run(GeminiSSEMeter, [read("gemini/image_stream.sse")])
    assert u.meters == meters(7, 0, 10, 1)
    assert u.final


def test_sse_error_midstream() -> None:
    u = run(GeminiSSEMeter, [read("gemini/stream_error_midstream.sse")])
    assert u.meters == meters(8, 0, 286, 0)
    assert u.error == UNAVAILABLE
    assert u.seen and not u.final


def test_sse_mid_stream_usage() -> None:
    body = read("gemini/stream_generate_content.sse")
    m = GeminiSSEMeter()
    assert m.usage() == Usage(meters=meters(0, 0, 0, 0))
    m.feed(body[: body.index(b"data:", 10)])
    u = m.usage()
    assert u.meters == meters(8, 0, 286, 0) and not u.final


def test_sse_chunk_without_usage_keeps_last_and_images_sum() -> None:
    c1 = {"candidates": [{"content": {"parts": [part_image()]}}], "usageMetadata": {"promptTokenCount": 4}}
    c2 = {"candidates": [{"content": {"parts": [part_image(), part_image()]}}]}
    c3 = {"candidates": [{"content": {"parts": [{"text": "."}]}, "finishReason": "STOP"}]}
    body = b"".join(b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in (c1, c2, c3))
    u = run(GeminiSSEMeter, [body])
    assert u.meters == meters(4, 0, 0, 3)
    assert u.raw == {"promptTokenCount": 4} and u.final


SSE_STREAMS = [
    "gemini/stream_generate_content.sse",
    "gemini/image_stream.sse",
    "gemini/stream_error_midstream.sse",
    "edge/gemini_stream_lf.sse",
    "edge/gemini_stream_data_nospace.sse",
]


@pytest.mark.parametrize("name", SSE_STREAMS)
def test_sse_split_invariance(name: str) -> None:
    body = read(name)
    assert assert_split_invariant(GeminiSSEMeter, body) == run(GeminiSSEMeter, [body])


# --- chunks parsed only when they can matter (gemini._Accumulator.observe_chunk) ---------------


def eager(chunks: list[bytes]) -> Usage:
    """What parsing and observing every chunk gives: the meaning the deferred parse must keep."""
    acc = _Accumulator()
    for chunk in chunks:
        try:
            acc.observe(orjson.loads(chunk))
        except orjson.JSONDecodeError:
            pass
    return acc.usage()


def lazy(chunks: list[bytes]) -> Usage:
    acc = _Accumulator()
    for chunk in chunks:
        acc.observe_chunk(chunk)
    return acc.usage()


def text_chunk(prompt: int, out: int, text: str = "word") -> bytes:
    return orjson.dumps(
        {
            "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}],
            "usageMetadata": {"promptTokenCount": prompt, "candidatesTokenCount": out},
        }
    )


def random_chunk(rng: random.Random, n: int) -> bytes:
    kind = rng.randrange(10)
    if kind <= 3:
        return text_chunk(n, 2 * n)
    if kind == 4:  # no totals at all
        return orjson.dumps({"candidates": [{"content": {"parts": [{"text": "x"}]}}]})
    if kind == 5:  # the field names only inside the text
        return text_chunk(n, n, 'says "usageMetadata" and "finishReason"')
    if kind == 6:  # totals that are not an object
        return orjson.dumps({"usageMetadata": None, "candidates": []})
    if kind == 7:  # malformed, with or without what looks like totals
        return rng.choice([b'{"usageMetadata": {"promptTokenCount": 99}', b"{not json", b""])
    if kind == 8:
        return orjson.dumps({"candidates": [{"content": {"parts": [part_image()]}}], "usageMetadata": {"x": n}})
    final: dict[str, Any] = {"candidates": [{"finishReason": "STOP"}]}
    if n % 2:
        final["usageMetadata"] = {"promptTokenCount": n}
    return orjson.dumps(final)


def test_deferred_parse_gives_what_parsing_every_chunk_gives() -> None:
    rng = random.Random(7)
    for _ in range(400):
        chunks = [random_chunk(rng, n) for n in range(rng.randint(0, 80))]
        assert lazy(chunks) == eager(chunks), chunks
        cut = rng.randint(0, len(chunks))  # a reading mid-stream (a client that left) changes nothing after it
        acc = _Accumulator()
        for chunk in chunks[:cut]:
            acc.observe_chunk(chunk)
        assert acc.usage() == eager(chunks[:cut])
        for chunk in chunks[cut:]:
            acc.observe_chunk(chunk)
        assert acc.usage() == eager(chunks)


def test_text_chunks_are_kept_unparsed_until_read_and_bounded() -> None:
    acc = _Accumulator()
    acc.observe_chunk(text_chunk(5, 1))
    acc.observe_chunk(text_chunk(5, 2))
    assert acc.metadata is None  # not parsed yet
    assert acc.usage().meters == meters(5, 0, 2, 0)
    for n in range(3 * gemini.MAX_DEFERRED):
        acc.observe_chunk(text_chunk(5, n))
        assert len(acc._deferred) < gemini.MAX_DEFERRED
    assert acc.usage().meters == meters(5, 0, 3 * gemini.MAX_DEFERRED - 1, 0)


def test_a_malformed_newest_chunk_keeps_the_totals_before_it() -> None:
    chunks = [text_chunk(5, 1), text_chunk(5, 2), b'{"usageMetadata": {"promptTokenCount": 99}']
    assert lazy(chunks).meters == meters(5, 0, 2, 0) == eager(chunks).meters


# --- JSON array stream -----------------------------------------------------------------------

ARRAY = "gemini/stream_generate_content_array.json"


def test_array_stream() -> None:
    u = run(GeminiArrayMeter, [read(ARRAY)])
    assert u.meters == TEXT_STREAM
    assert u.final and u.seen and u.error is None
    assert u.raw == orjson.loads(read(ARRAY))[-1]["usageMetadata"]
    assert u == run(GeminiSSEMeter, [read("gemini/stream_generate_content.sse")])


def test_array_split_invariance() -> None:
    assert assert_split_invariant(GeminiArrayMeter, read(ARRAY)) == run(GeminiArrayMeter, [read(ARRAY)])


def test_array_final_only_at_close_without_finish_reason() -> None:
    body = b'[{"usageMetadata": {"promptTokenCount": 3}}\r\n,{"candidates": []}\r\n'
    m = GeminiArrayMeter()
    m.feed(body)
    assert m.usage().meters == meters(3, 0, 0, 0) and not m.usage().final
    m.feed(b"]")
    assert m.usage().final


@pytest.mark.parametrize(
    "body",
    [
        b'[{\n  "error": {"code": 503, "message": "The model is overloaded. Please try again later.", '
        b'"status": "UNAVAILABLE"}\n}\n]',
        b'{"error": {"code": 503, "message": "The model is overloaded. Please try again later.", '
        b'"status": "UNAVAILABLE"}}',
    ],
)
def test_array_error(body: bytes) -> None:
    u = assert_split_invariant(GeminiArrayMeter, body)
    assert u.error == UNAVAILABLE and not u.seen and u.final


def test_array_mid_stream_usage() -> None:
    body = read(ARRAY)
    m = GeminiArrayMeter()
    m.feed(body[: body.index(b"},\r\n") + 1])
    u = m.usage()
    assert u.meters == meters(8, 0, 286, 0) and not u.final


def test_scanner_strings_with_structural_characters() -> None:
    elements = [
        {"text": 'braces } ] { [ and "quotes" and \\ backslash \\', "n": [1, {"a": []}]},
        {"text": '\\\\"', "u": "snow ☃ é"},
        {},
        [{"x": "]"}],
    ]
    body = b"[" + b"\r\n,".join(orjson.dumps(e) for e in elements) + b"\r\n]  trailing"
    for step in (1, 2, 3, 5, len(body)):
        scanner = JSONArrayScanner()
        found: list[bytes] = []
        for i in range(0, len(body), step):
            found.extend(scanner.feed(body[i : i + step]))
        assert [orjson.loads(f) for f in found] == elements
        assert scanner.done


def test_scanner_skips_scalars_and_ignores_after_close() -> None:
    scanner = JSONArrayScanner()
    assert scanner.feed(b'[1, "a]", {"k": 2}, null]') == [b'{"k": 2}']
    assert scanner.done
    assert scanner.feed(b'[{"k": 3}]') == []
