"""Request-side reservation estimates."""

from __future__ import annotations

import pytest

from gateway.metering import estimate_input_tokens, requested_max_output, wants_images


def test_estimate_input_tokens() -> None:
    assert estimate_input_tokens(b"") == 16
    assert estimate_input_tokens(b"x") == 16
    assert estimate_input_tokens(b"x" * 1001) == 516


def test_estimate_is_an_upper_bound_for_fixture_requests() -> None:
    # message.json answers a short prompt with input_tokens=12.
    body = b'{"model":"claude-sonnet-4-6","max_tokens":1024,"messages":[{"role":"user","content":"Hello"}]}'
    assert estimate_input_tokens(body) >= 12


def test_requested_max_output_anthropic() -> None:
    assert requested_max_output({"max_tokens": 1024}, "anthropic") == 1024
    assert requested_max_output({}, "anthropic") is None
    assert requested_max_output({"max_tokens": "1024"}, "anthropic") is None
    assert requested_max_output({"max_tokens": True}, "anthropic") is None
    assert requested_max_output({"max_tokens": -1}, "anthropic") is None
    assert requested_max_output({"generationConfig": {"maxOutputTokens": 5}}, "anthropic") is None


def test_requested_max_output_gemini() -> None:
    assert requested_max_output({"generationConfig": {"maxOutputTokens": 256}}, "gemini") == 256
    assert requested_max_output({"generation_config": {"max_output_tokens": 128}}, "gemini") == 128
    assert requested_max_output({"generationConfig": {"max_output_tokens": 64}}, "gemini") == 64
    assert requested_max_output({"generationConfig": {"temperature": 0.1}}, "gemini") is None
    assert requested_max_output({"generationConfig": None}, "gemini") is None
    assert requested_max_output({"max_tokens": 9}, "gemini") is None
    assert requested_max_output({"max_tokens": 9}, "openai") is None


@pytest.mark.parametrize(
    ("body", "model", "expected"),
    [
        ({"generationConfig": {"responseModalities": ["TEXT", "IMAGE"]}}, "gemini-2.5-flash", True),
        ({"generation_config": {"response_modalities": ["image"]}}, "gemini-2.5-flash", True),
        ({"generationConfig": {"responseModalities": ["TEXT"]}}, "gemini-2.5-flash", False),
        ({}, "gemini-2.5-flash-image", True),
        ({}, "models/gemini-2.5-flash-image-preview", True),
        ({}, "imagen-4.0-generate-001", True),
        ({}, "Imagen-3.0", True),
        ({}, "gemini-2.5-flash", False),
        ({"generationConfig": {"responseModalities": "IMAGE"}}, "gemini-2.5-pro", True),
        ({"generationConfig": {"responseModalities": [None, 3]}}, "gemini-2.5-pro", False),
        # integer enums (proto3 JSON, what Google's REST clients send): TEXT = 1, IMAGE = 2, AUDIO = 3
        ({"generationConfig": {"responseModalities": [1, 2]}}, "gemini-2.0-flash-exp", True),
        ({"generationConfig": {"responseModalities": [True, 1]}}, "gemini-2.0-flash-exp", False),
    ],
)
def test_wants_images(body: dict[str, object], model: str, expected: bool) -> None:
    assert wants_images(body, model) is expected
