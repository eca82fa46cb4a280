"""The result type every extractor returns, and the meter protocol the relay feeds.

Kept separate so provider modules and callers share one definition without import cycles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from gateway.metering.sse import SSEParser


@dataclass(slots=True)
class Usage:
    """Billable quantities seen so far for one HTTP response.

    `meters` always holds every meter of the provider (zeros allowed) so callers never
    need `.get` defaults; `raw` keeps the provider's own usage JSON for audit.
    """

    meters: dict[str, int]
    raw: Any = None
    final: bool = False
    error: Any = None
    seen: bool = False


class StreamMeter(Protocol):
    """Observes relayed bytes; must be cheap per chunk and must never raise into the relay."""

    @property
    def sse(self) -> SSEParser | None:
        """The parser fed every chunk of an SSE stream (None for another format). Its `idle` after a
        chunk tells the relay, for an attribute's cost, that the bytes so far end with a whole event."""
        ...

    def feed(self, chunk: bytes) -> None: ...

    def usage(self) -> Usage: ...


# isinstance() with `bytes | bytearray | memoryview` builds that union on every call.
BINARY = (bytes, bytearray, memoryview)


def as_count(value: object) -> int:
    """Coerce a provider count to a non-negative int; anything odd (null, bool, str) is 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value if value > 0 else 0
    if isinstance(value, float) and value > 0:
        return int(value)
    return 0
