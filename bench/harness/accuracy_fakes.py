"""Accuracy bench: shared constants (tokens, fixtures' usage, plan) and the instrumented fake upstream and Polar.

Needs the repository root on sys.path (tests.fakes); bench/accuracy.py puts it there.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fakes.polar import FakePolar
from tests.fakes.upstream import FIXTURES_DIR, FakeUpstream, Reply

ROOT = Path(__file__).resolve().parent.parent.parent
ADMIN_TOKEN = "accuracy-admin-token"
POLAR_TOKEN = "polar_oat_ACCURACY"
TAG_RE = re.compile(r"acc\d{6}")
MESSAGES: list[Any] = [{"role": "user", "content": "Hello"}]
CLAUDE_MAX_TOKENS = 64  # >= what the fixtures report (15): a real provider never exceeds max_tokens
GEMINI_MAX_OUTPUT = 300  # >= 296, same reason

# What each fixture the fake upstream serves bills, per meter (the provider's own usage numbers).
FIXTURE_USAGE: dict[str, dict[str, int]] = {
    "anthropic/message.json": {"claude_input_tokens": 12, "claude_output_tokens": 9},
    "anthropic/stream_text.sse": {"claude_input_tokens": 25, "claude_output_tokens": 15},
    "gemini/generate_content.json": {"gemini_input_tokens": 8, "gemini_output_tokens": 294},
    "gemini/stream_generate_content.sse": {"gemini_input_tokens": 8, "gemini_output_tokens": 296},
}
FIXTURE_BY_BYTES = {(FIXTURES_DIR / name).read_bytes(): name for name in FIXTURE_USAGE}
TOKEN_METERS = ["claude_input_tokens", "claude_output_tokens", "gemini_input_tokens", "gemini_output_tokens"]
# Same plan for every user (the plan is per gateway); heavy users send enough to run into it.
PLAN = {"claude_output_tokens": 200, "gemini_output_tokens": 3000}


# ---------------------------------------------------------------------------------------------- fakes
class _Written(list[bytes]):
    """Stream chunks that call `done` once the fake has written the last one (iteration resumes
    after each write + drain), i.e. the provider delivered its final usage event."""

    def __init__(self, chunks: list[bytes], done: Callable[[], None]) -> None:
        super().__init__(chunks)
        self._done = done

    def __iter__(self) -> Iterator[bytes]:
        yield from list.__iter__(self)
        self._done()


@dataclass
class Attempt:
    """One request as the upstream received it: its bench tag, the fixture it answered, whether whole."""

    tag: str
    fixture: str
    served: bool = False


class BenchUpstream(FakeUpstream):
    """FakeUpstream with ground truth per received request: which fixture it got, whether it was served whole.

    Hooks `_send` (the fake's one place that writes a reply) to slow replies down, so that the kill
    finds streams in flight, and to observe completion; routing stays the fake's default. Kept per
    attempt, not per tag: a client that resends a request makes the provider serve (and bill) twice."""

    def __init__(self, stream_delay: float, json_delay: float) -> None:
        super().__init__()
        self.stream_delay = stream_delay
        self.json_delay = json_delay
        self.attempts: list[Attempt] = []  # in arrival order
        self.streams_in_flight = 0

    async def _send(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        body = await request.read()  # cached by the fake's handler already
        m = TAG_RE.search(request.path) or TAG_RE.search(body.decode("utf-8", "replace"))
        if m is None:
            return await super()._send(request, reply)
        content = reply.body if reply.chunks is None else b"".join(reply.chunks)
        fixture = FIXTURE_BY_BYTES.get(content, f"other: {request.method} {request.path} {reply.status}")
        attempt = Attempt(m.group(0), fixture)
        self.attempts.append(attempt)

        def done() -> None:
            attempt.served = True

        if reply.chunks is None:
            reply = dataclasses.replace(reply, delay_before=self.json_delay)
            resp = await super()._send(request, reply)
            done()  # the body is written (Content-Length framing): served
            return resp
        reply = dataclasses.replace(reply, chunks=_Written(reply.chunks, done), delay_between=self.stream_delay)
        self.streams_in_flight += 1
        try:
            return await super()._send(request, reply)
        finally:
            self.streams_in_flight -= 1


class BenchPolar(FakePolar):
    """FakePolar that also counts the duplicates it accepted (a resend Polar deduplicated), which
    `sent` cannot tell apart from attempts refused while it was down."""

    def __init__(self, token: str) -> None:
        super().__init__(token=token)
        self.duplicates_accepted = 0

    async def _ingest(self, request: web.Request) -> web.Response:
        resp = await super()._ingest(request)
        if resp.status == 200 and isinstance(resp.body, bytes):
            self.duplicates_accepted += int(json.loads(resp.body).get("duplicates", 0))
        return resp
