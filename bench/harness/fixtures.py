"""The recorded fixtures the fake upstream serves, and the benchmark cells (fixture x connections)."""

from __future__ import annotations

from dataclasses import dataclass

from .settings import FIXTURES, SLOW_CONNECTIONS, SLOW_EVENT_GAP, SLOW_EVENTS, SLOW_JSON_DELAY

# --- fixtures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixture:
    name: str  # also the wrk script and the upstream's internal location
    provider: str  # "anthropic" | "gemini"
    path: str  # fixture file under tests/fixtures
    stream: bool
    content_type: str
    headers: tuple[tuple[str, str], ...]
    usage: dict[str, int]  # meter -> tokens per request (the fixture's final usage)

    def body(self) -> bytes:
        return (FIXTURES / self.path).read_bytes()

    def events(self, slow: bool = False) -> list[bytes]:
        """The SSE transcript split into events (each with its blank-line terminator)."""
        events = split_events(self.body())
        if slow:
            events = stretch_events(events, SLOW_EVENTS)
        return events

    def served(self, slow: bool = False) -> bytes:
        """The exact body the upstream serves and the client must receive."""
        return b"".join(self.events(slow)) if self.stream else self.body()


ANTHROPIC_HEADERS = (("request-id", "req_011CbenchAaaaaaaaaaaaaaa"), ("anthropic-organization-id", "bench-org"))
GEMINI_HEADERS = (("server-timing", "gfet4t7; dur=412"), ("x-content-type-options", "nosniff"))

FIXTURE_LIST = (
    Fixture(
        "anthropic_json",
        "anthropic",
        "anthropic/message.json",
        False,
        "application/json",
        ANTHROPIC_HEADERS,
        {"claude_input_tokens": 12, "claude_output_tokens": 9},
    ),
    Fixture(
        "anthropic_sse",
        "anthropic",
        "anthropic/stream_text.sse",
        True,
        "text/event-stream; charset=utf-8",
        ANTHROPIC_HEADERS,
        {"claude_input_tokens": 25, "claude_output_tokens": 15},
    ),
    Fixture(
        "gemini_json",
        "gemini",
        "gemini/generate_content.json",
        False,
        "application/json; charset=UTF-8",
        GEMINI_HEADERS,
        {"gemini_input_tokens": 8, "gemini_output_tokens": 9 + 285},
    ),
    Fixture(
        "gemini_sse",
        "gemini",
        "gemini/stream_generate_content.sse",
        True,
        "text/event-stream",
        GEMINI_HEADERS,
        {"gemini_input_tokens": 8, "gemini_output_tokens": 10 + 286},
    ),
)
FIXTURES_BY_NAME = {f.name: f for f in FIXTURE_LIST}


def split_events(body: bytes) -> list[bytes]:
    sep = b"\r\n\r\n" if b"\r\n\r\n" in body else b"\n\n"
    parts = body.split(sep)
    events = [p + sep for p in parts[:-1]]
    if parts[-1]:
        events.append(parts[-1])
    assert b"".join(events) == body
    return events


def stretch_events(events: list[bytes], total: int) -> list[bytes]:
    """Repeat the content events so the stream has `total` events and the same final usage.

    Anthropic: keep message_start..ping and content_block_stop..message_stop, repeat the deltas.
    Gemini: keep the first and last chunk (the last carries the final usage), repeat the middle.
    """
    deltas = [i for i, e in enumerate(events) if b"content_block_delta" in e]
    first, last = (deltas[0], deltas[-1]) if deltas else (1, len(events) - 2)
    pre, mid, post = events[:first], events[first : last + 1], events[last + 1 :]
    fill = total - len(pre) - len(post)
    return pre + [mid[i % len(mid)] for i in range(fill)] + post


# --- cells ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    fixture: Fixture
    connections: int

    @property
    def name(self) -> str:
        return f"{self.fixture.name}@{self.connections}"

    @property
    def label(self) -> str:
        provider = "Anthropic" if self.fixture.provider == "anthropic" else "Gemini"
        return f"{provider} {'SSE' if self.fixture.stream else 'JSON'}"


def fast_cells() -> list[Cell]:
    f = FIXTURES_BY_NAME
    return [
        Cell(f["anthropic_json"], 1),
        Cell(f["anthropic_json"], 16),
        Cell(f["anthropic_json"], 64),
        Cell(f["anthropic_sse"], 16),
        Cell(f["gemini_json"], 16),
        Cell(f["gemini_sse"], 16),
    ]


def slow_cells() -> list[Cell]:
    return [Cell(f, SLOW_CONNECTIONS) for f in FIXTURE_LIST]


def ideal_latency(fixture: Fixture) -> float:
    return (SLOW_EVENTS - 1) * SLOW_EVENT_GAP if fixture.stream else SLOW_JSON_DELAY
