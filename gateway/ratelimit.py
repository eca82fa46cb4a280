"""Per-user rate limits: requests and tokens per minute over a sliding 60 s window.

Tokens are counted as reserved at pre-check (estimate) and corrected to the actual usage
when the request ends, so parallel requests cannot all pass on the same window.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW = 60.0


@dataclass(slots=True)
class _Entry:
    at: float
    tokens: int


@dataclass(slots=True)
class _Window:
    entries: deque[_Entry] = field(default_factory=deque)
    tokens: int = 0

    def expire(self, now: float) -> None:
        while self.entries and self.entries[0].at <= now - WINDOW:
            self.tokens -= self.entries.popleft().tokens


@dataclass(frozen=True, slots=True)
class RateLimited:
    reason: str  # "requests" | "tokens"
    retry_after: int  # seconds


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def acquire(self, user_id: str, tokens: int) -> tuple[RateLimited | None, object | None]:
        """Admit one request with an estimated token cost, or say when to retry.

        Returns (refusal, ticket); pass the ticket to `settle` with the actual tokens.
        """
        if self.rpm is None and self.tpm is None:
            return None, None
        now = self._clock()
        win = self._windows.get(user_id)
        if win is None:
            win = self._windows[user_id] = _Window()
        win.expire(now)
        if self.rpm is not None and len(win.entries) >= self.rpm:
            return RateLimited("requests", self._retry_after(win.entries[0].at, now)), None
        if self.tpm is not None and win.entries and win.tokens + tokens > self.tpm:
            # Free the oldest entries until it would fit; a lone over-sized request is let through.
            need, freed, at = win.tokens + tokens - self.tpm, 0, win.entries[0].at
            for e in win.entries:
                freed += e.tokens
                at = e.at
                if freed >= need:
                    break
            return RateLimited("tokens", self._retry_after(at, now)), None
        entry = _Entry(now, tokens)
        win.entries.append(entry)
        win.tokens += tokens
        return None, entry

    def settle(self, user_id: str, ticket: object | None, actual_tokens: int) -> None:
        if not isinstance(ticket, _Entry):
            return
        win = self._windows.get(user_id)
        if win is None or not win.entries or ticket.at <= self._clock() - WINDOW:
            return  # already expired out of the window
        win.tokens += actual_tokens - ticket.tokens
        ticket.tokens = actual_tokens

    @staticmethod
    def _retry_after(oldest: float, now: float) -> int:
        return max(1, math.ceil(oldest + WINDOW - now))
