"""Shared check: a meter's Usage must not depend on where the relay's chunks were cut."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from gateway.metering import StreamMeter, Usage


def run(factory: Callable[[], StreamMeter], chunks: Iterable[bytes]) -> Usage:
    meter = factory()
    for chunk in chunks:
        meter.feed(chunk)
    return meter.usage()


def assert_split_invariant(factory: Callable[[], StreamMeter], body: bytes) -> Usage:
    """Every single split point, 1-byte chunks and seeded random multi-splits equal the whole."""
    whole = run(factory, [body])
    for i in range(len(body) + 1):
        assert run(factory, [body[:i], body[i:]]) == whole, f"split at {i}"
    assert run(factory, (body[i : i + 1] for i in range(len(body)))) == whole, "1-byte chunks"
    rng = random.Random(len(body))
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(body)), k=rng.randint(2, 20)))
        parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        assert run(factory, parts) == whole, f"cuts {cuts}"
    return whole
