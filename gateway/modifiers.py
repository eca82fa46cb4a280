"""Pricing modifiers: fields of a request's raw usage that price it otherwise than its counts say.

Anthropic reports them in `usage`: `service_tier` (standard, priority, batch), `speed` (standard,
fast: priced several times higher) and `inference_geo` (global, the default, or us: priced higher).
They reach Polar as string metadata of the request's events, so a Polar meter can filter on them. A
default value, or none, adds nothing: an ordinary request's events stay as they were.

Gemini's generateContent `usageMetadata` names no such field for the Gemini API (its `trafficType`
is Vertex only), so Gemini events carry none.

Read at sync time from the stored raw usage (the outbox queries select only these fields), never on
a request's path.
"""

from __future__ import annotations

from collections.abc import Iterable

# Raw usage field (also its metadata key) -> the values that are the standard price.
DEFAULTS: dict[str, frozenset[str]] = {
    "service_tier": frozenset({"standard"}),
    "speed": frozenset({"standard"}),
    "inference_geo": frozenset({"global"}),
}
# The order the outbox queries select them in.
FIELDS = tuple(DEFAULTS)

Modifiers = tuple[tuple[str, str], ...]


def modifiers(values: Iterable[object]) -> Modifiers:
    """(metadata key, value) of each non-default modifier, from the raw values in `FIELDS` order
    (None for absent; anything but a non-empty string is not a modifier)."""
    out: list[tuple[str, str]] = []
    for field, value in zip(FIELDS, values, strict=True):
        if isinstance(value, str) and value and value not in DEFAULTS[field]:
            out.append((field, value))
    return tuple(out)
