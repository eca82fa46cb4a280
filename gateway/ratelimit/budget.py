"""What a shared rate-limit backend does: grant a slice of a user's per-minute budget, take corrections.

A backend (SQLite, PostgreSQL, Redis) keeps per user a window of 1 s buckets (requests, tokens). A
take is atomic on it: hand back the rest of the asking process's last lease, then at the backend's
clock check that the window (the last WINDOW seconds) has room for one more request of `need`
tokens, book a slice of `requests` and `tokens` (sized by `slice_of`) into the bucket of the
current second, and say which second and when. The lease logic
that spends slices locally lives in gateway/ratelimit/lease.py; `slice_of` is the one rule the
backends share (Redis runs a Lua copy of it: keep the two alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from gateway.ratelimit.limiter import RateLimited, freed_at

SLICE = 8  # a slice is at most 1/SLICE of what the window has left (but never less than the request)

Bucket = tuple[int, int, int]  # second, requests, tokens
Correction = tuple[int, int, int]  # second, requests delta, tokens delta


class NotApplied(Exception):
    """`rate_correct` failed before the backend could apply any of the batch (it was not reached, or
    rolled the batch back): it may be sent again. Any other error may come after the backend applied
    it (an answer lost: a dropped connection, a timeout)."""


class Want(NamedTuple):
    """A take's question: a slice this big, at least one request of `need` tokens, under these limits."""

    requests: int
    tokens: int
    need: int  # tokens of the request that asks (the slice is never smaller)
    rpm: int | None
    tpm: int | None


class Grant(NamedTuple):
    """A take's answer: booked into `second`, read at the backend's clock `now`."""

    second: int
    now: float
    requests: int
    tokens: int
    room: int  # tokens the window had left before this slice (tokens per minute minus the window's total)


class RateBudget(Protocol):
    """Per-user windows of 1 s buckets in a backend the processes share."""

    async def rate_take(
        self, user_id: str, want: Want, now: float | None, back: Correction | None
    ) -> Grant | RateLimited:
        """Atomically: add `back` to its bucket (a lease's rest handed back), then at time `now` (None:
        the backend's clock) refuse, or book `slice_of(...)` into the bucket of that second."""
        ...

    async def rate_correct(self, corrections: Sequence[tuple[str, int, int, int]]) -> None:
        """Add (user, second, requests delta, tokens delta) to buckets that still exist, all or none;
        `NotApplied` when certainly none (see there)."""
        ...

    async def rate_sweep(self, now: float | None) -> int:
        """Delete every bucket out of the window at `now` (None: the backend's clock); how many."""
        ...


def slice_of(buckets: Sequence[Bucket], now: float, want: Want) -> Grant | RateLimited:
    """The refusal, or the slice to book, for `want` on a window's live buckets (oldest first) at `now`.

    The in-memory limiter's rules: refuse when the requests are used up, or when the tokens would
    not fit (unless the window holds no request: a lone over-sized request passes; or it needs none:
    an unmetered request counts against requests only); Retry-After is when enough of the oldest
    buckets have left for it to pass both.
    """
    used = sum(b[1] for b in buckets)
    spent = sum(b[2] for b in buckets)
    rpm, tpm = want.rpm, want.tpm
    if rpm is not None and used >= rpm:
        return RateLimited("requests", freed_at(buckets, used, spent, rpm, tpm, want.need, now))
    if tpm is not None and want.need and used and spent + want.need > tpm:
        return RateLimited("tokens", freed_at(buckets, used, spent, rpm, tpm, want.need, now))
    requests = want.requests if rpm is None else max(1, min(want.requests, (rpm - used) // SLICE))
    room = 0 if tpm is None else tpm - spent
    tokens = want.tokens if tpm is None else max(want.need, min(want.tokens, room // SLICE))
    return Grant(int(now), now, requests, tokens, room)
