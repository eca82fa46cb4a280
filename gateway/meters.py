"""Meter names: fixed, they are the Polar meter names."""

from __future__ import annotations

CLAUDE_INPUT = "claude_input_tokens"
CLAUDE_OUTPUT = "claude_output_tokens"
CLAUDE_CACHE_WRITE = "claude_cache_write_tokens"
CLAUDE_CACHE_READ = "claude_cache_read_tokens"
GEMINI_INPUT = "gemini_input_tokens"
GEMINI_CACHED = "gemini_cached_tokens"
GEMINI_OUTPUT = "gemini_output_tokens"
GEMINI_IMAGES = "gemini_images"

CLAUDE_METERS = (CLAUDE_INPUT, CLAUDE_OUTPUT, CLAUDE_CACHE_WRITE, CLAUDE_CACHE_READ)
GEMINI_METERS = (GEMINI_INPUT, GEMINI_CACHED, GEMINI_OUTPUT, GEMINI_IMAGES)
ALL_METERS = CLAUDE_METERS + GEMINI_METERS

# gemini_images is a COUNT meter in Polar: one event per image, each with value 1.
COUNT_METERS = frozenset({GEMINI_IMAGES})
