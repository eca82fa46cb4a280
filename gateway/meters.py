"""Meter names: fixed, they are the Polar meter names."""

from __future__ import annotations

CLAUDE_INPUT = "claude_input_tokens"
CLAUDE_OUTPUT = "claude_output_tokens"
CLAUDE_CACHE_WRITE = "claude_cache_write_tokens"
CLAUDE_CACHE_WRITE_1H = "claude_cache_write_1h_tokens"
CLAUDE_CACHE_READ = "claude_cache_read_tokens"
CLAUDE_WEB_SEARCHES = "claude_web_searches"
GEMINI_INPUT = "gemini_input_tokens"
GEMINI_CACHED = "gemini_cached_tokens"
GEMINI_OUTPUT = "gemini_output_tokens"
GEMINI_IMAGES = "gemini_images"

CLAUDE_METERS = (
    CLAUDE_INPUT,
    CLAUDE_OUTPUT,
    CLAUDE_CACHE_WRITE,
    CLAUDE_CACHE_WRITE_1H,
    CLAUDE_CACHE_READ,
    CLAUDE_WEB_SEARCHES,
)
GEMINI_METERS = (GEMINI_INPUT, GEMINI_CACHED, GEMINI_OUTPUT, GEMINI_IMAGES)
ALL_METERS = CLAUDE_METERS + GEMINI_METERS

# COUNT meters in Polar: one event per unit (image, web search), each with value 1.
COUNT_METERS = frozenset({GEMINI_IMAGES, CLAUDE_WEB_SEARCHES})
# Meters that are a part of another meter: claude_cache_write_1h_tokens is the part of
# claude_cache_write_tokens written with a 1-hour TTL, so those tokens are counted twice per request.
SUBSET_METERS = frozenset({CLAUDE_CACHE_WRITE_1H})
# Left out of any total of tokens (rate limits, the dashboard's token charts): counts, and subsets.
NOT_TOKENS = COUNT_METERS | SUBSET_METERS

# The most one request reserves or bills on a meter: far past any real request (a context window holds a few
# million tokens, a response a few images or web searches), so only a client's or a provider's absurd number
# meets it. Unbounded, such a number overflowed the journal's JSON and the stores' 64-bit integers, and a
# COUNT meter's one Polar event per unit would have the sync build millions of events.
MAX_TOKENS_PER_REQUEST = 2**31 - 1
MAX_UNITS_PER_REQUEST = 1000
# The most units a Polar limit (credited units, balance, consumed) is kept at: Polar's numbers are unbounded, the
# stores' integers (and SQL sums over them) are 64-bit. 2^53 is far past any real grant and exact as a float.
MAX_CREDITED_UNITS = 2**53


def bounded(amounts: dict[str, int]) -> dict[str, int]:
    """`amounts` with each meter at most its per-request ceiling (the same dict when none is over)."""
    for name, value in amounts.items():
        if value > MAX_UNITS_PER_REQUEST and (name in COUNT_METERS or value > MAX_TOKENS_PER_REQUEST):
            return {
                n: min(v, MAX_UNITS_PER_REQUEST if n in COUNT_METERS else MAX_TOKENS_PER_REQUEST)
                for n, v in amounts.items()
            }
    return amounts
