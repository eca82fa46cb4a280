"""Shared rate limits by leases of the per-minute budget: a round trip per user and second, not per request.

The windows are 1 s buckets in a backend the processes share (`RateBudget`: SQLite, PostgreSQL,
Redis). A process asks the backend for a *lease*: one atomic take books a slice of requests and
tokens into the user's bucket of the backend's current second (only if the window has room for at
least the asking request) and returns that second and the backend's time. The process then admits
that user's requests from the slice, with no round trip, until the slice is spent or the second
ends: the backend's time is mapped to the local monotonic clock (one that counts a suspended
machine's sleep: `timeutil.suspend_clock`) at the take (taken before asking,
so the local deadline is never after the second's true end). The unspent rest goes back with the
process's next take for the user, in the same atomic step (so a request the slice cannot cover
finds the room it held), or when the second ends (a timer) or on close as a negative correction,
in the background with the token corrections.
A process runs one take per user at a time: requests arriving meanwhile wait for it and spend its
slice; a failed backend answers them all, and a refusal for requests all those needing no more
tokens than the request that asked (its Retry-After is long enough for them; it held while they waited).

Why it stays exact: every request is counted in the bucket of the second it was admitted in (its
slice was booked there), and a slice is booked only when the window, slices held by others
included, has room for it. So the window never holds more than the limit, as with the in-memory
limiter of gateway/ratelimit/limiter.py.

What it can cost: a refusal the in-memory limiter would not have given, when the window's room is
held by other processes' unspent slices. A slice is sized by its process's own demand (twice what it
admitted in the last second, or its waiting requests) but is at most 1/SLICE of what the window has
left, and never less than the request: near the limit (less than SLICE requests, or SLICE times the
request's tokens, left) it is the request itself and nothing is held. A held rest lives until the
end of its holder's second plus the hand-back's trip (normally milliseconds), so such a refusal can
only happen within about 1 s of a take, for at most the sum of the held rests; the room it left
goes to the next request. The refused client is told the window's Retry-After (when its oldest
buckets leave), as before. A process killed while holding a rest loses it for the window (60 s).

Token corrections (`settle`) of a request admitted in a lease's second still running adjust the
lease (a refund stays in it up to 1/SLICE of the window's room at the take); the others go to the
backend in the background, batched (gateway/ratelimit/settler.py). A failing backend never fails a
request: the limiter admits (`on_store_error = "open"`) or refuses with Retry-After 1 ("closed");
a lease already taken is still spent meanwhile.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.deadlines import within
from gateway.ratelimit.budget import SLICE, Grant, RateBudget, Want
from gateway.ratelimit.limiter import RateLimited, StoreErrorPolicy
from gateway.ratelimit.settler import Corrections, ErrorLog, Settler, on_store_error
from gateway.timeutil import suspend_clock

GROWTH = 2  # a slice asks for this many times what its process admitted in the last second
SWEEP_SECONDS = 60.0  # between deletions of every user's buckets out of the window (after a take)
Ticket = tuple[int, int]  # the second it was admitted in, the tokens it reserved


@dataclass(slots=True)
class Lease:
    """A slice of one user's budget, booked into the backend's `second`, spent locally."""

    second: int
    deadline: float  # local clock: the backend's `second` has not ended before this
    requests: int  # booked and not spent (below 0 without a requests limit: spent past the booking)
    tokens: int
    hold: int  # most tokens refunds may leave in it: 1/SLICE of the window's room at the take (or less)
    admitted: int = 0  # requests it admitted, and their reserved tokens: what the next slice asks
    spent: int = 0
    ended: bool = False  # handed back (kept a second longer to size the next slice)


class _StoreFailed:
    pass


STORE_FAILED = _StoreFailed()
Outcome = Ticket | RateLimited | _StoreFailed  # of a take, for the request that asked


class LeasedRateLimiter:
    """`RateLimit` over a `RateBudget`, exact across the processes sharing it (see the module doc)."""

    def __init__(
        self,
        budget: RateBudget,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        on_store_error: StoreErrorPolicy = StoreErrorPolicy.OPEN,
        clock: Callable[[], float] | None = None,  # None: the backend's clock; tests inject one (for both clocks)
        what: str = "rate-limit store",
        timeout: float = 5.0,  # the longest a take is waited for; then the store counts as failed
    ) -> None:
        self.timeout = timeout
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self.budget = budget
        self._policy = on_store_error
        self._clock = clock
        self._local = clock or suspend_clock
        self._errors = ErrorLog(what)
        self._offset: float | None = None  # the backend's clock minus the local one, as the last take saw it
        self._settler = Settler(self._send, self._errors, self._backend_now)
        self._leases: dict[str, Lease] = {}
        self._taking: dict[str, tuple[asyncio.Task[Outcome], int]] = {}  # the take under way per user, its tokens
        self._waiting: dict[str, int] = {}  # requests per user that wait for a take (they size it)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._swept_at = -math.inf
        self._sweep_due = False

    async def acquire(self, user_id: str, tokens: int) -> tuple[RateLimited | None, object | None]:
        if self.rpm is None and self.tpm is None:
            return None, None
        if self.tpm is not None and tokens > self.tpm:
            # Any estimate past the whole budget passes alone, and fills the window until settled, alike;
            # as it came (the client's max_tokens, up to 2**64 - 1) it overflowed the backends' integers.
            tokens = self.tpm + 1
        lease = self._leases.get(user_id)
        if lease is not None:
            ticket = self._spend(lease, tokens)
            if ticket is not None:
                return None, ticket
        return await self._acquire_by_take(user_id, tokens)

    def settle(self, user_id: str, ticket: object | None, actual_tokens: int) -> None:
        if self.tpm is None or not isinstance(ticket, tuple):
            return
        second, reserved = ticket
        delta = actual_tokens - reserved
        if not delta:
            return
        lease = self._leases.get(user_id)
        if lease is not None and lease.second == second and not lease.ended and self._local() < lease.deadline:
            # Its bucket is still this lease's: correct the slice instead of the backend.
            if delta < 0:
                keep = min(-delta, lease.hold - lease.tokens)
                if keep > 0:
                    lease.tokens += keep
                    delta += keep
            elif lease.tokens > 0:
                cover = min(delta, lease.tokens)
                lease.tokens -= cover
                delta -= cover
        self._settler.add(user_id, second, 0, delta)

    def reap(self) -> None:
        """Hand back every lease whose second has ended; forget those ended a second ago (the timer's)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf
        now, wake = self._local(), math.inf
        for user_id, lease in list(self._leases.items()):
            if not lease.ended:
                if now < lease.deadline:
                    wake = min(wake, lease.deadline)
                    continue
                self._end(user_id, lease)
            if now >= lease.deadline + 1.0:
                del self._leases[user_id]
            else:
                wake = min(wake, lease.deadline + 1.0)
        if wake < math.inf:
            self._wake_at(wake)

    async def flush(self) -> None:
        """Wait until the corrections made so far (hand-backs included) reached the backend (or were
        dropped), for the store timeout at most (they are still retried after)."""
        await self._settler.flush(self.timeout)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf
        for user_id, lease in self._leases.items():
            if not lease.ended:
                self._end(user_id, lease)
        self._leases.clear()
        # Bounded, as shutdown waits for it: what a failing backend has not taken by then is lost.
        await self._settler.close(self.timeout)

    # --- leases ---------------------------------------------------------------------------------

    def _spend(self, lease: Lease, tokens: int) -> Ticket | None:
        """Admit one request of `tokens` from `lease`, or None when it cannot (ended, or too little left)."""
        if lease.ended or (self.rpm is not None and lease.requests < 1) or self._local() >= lease.deadline:
            return None
        if self.tpm is not None:
            if lease.tokens < tokens:
                return None
            lease.tokens -= tokens
        lease.requests -= 1
        lease.admitted += 1
        lease.spent += tokens
        return lease.second, tokens

    async def _acquire_by_take(self, user_id: str, tokens: int) -> tuple[RateLimited | None, object | None]:
        """One take per user at a time: the others wait for it, then try its slice."""
        self._waiting[user_id] = self._waiting.get(user_id, 0) + 1
        try:
            while True:
                taking = self._taking.get(user_id)
                if taking is None:
                    task = asyncio.get_running_loop().create_task(self._take(user_id, tokens))
                    self._taking[user_id] = task, tokens
                    # (shielded: a cancelled request does not lose a slice booked for it)
                    return self._answer(await asyncio.shield(task))
                task, asked = taking
                outcome = await asyncio.shield(task)
                if isinstance(outcome, _StoreFailed) or (
                    isinstance(outcome, RateLimited)
                    and outcome.reason == "requests"
                    and (self.tpm is None or tokens <= asked)  # (its Retry-After is then long enough for this one)
                ):
                    return self._answer(outcome)  # as true for this request, which waited meanwhile
                lease = self._leases.get(user_id)
                if lease is not None:
                    ticket = self._spend(lease, tokens)
                    if ticket is not None:
                        return None, ticket
        finally:
            left = self._waiting[user_id] - 1
            if left:
                self._waiting[user_id] = left
            else:
                del self._waiting[user_id]

    def _answer(self, outcome: Outcome) -> tuple[RateLimited | None, object | None]:
        if isinstance(outcome, _StoreFailed):
            return on_store_error(self._policy)
        if isinstance(outcome, RateLimited):
            return outcome, None
        return None, outcome

    async def _take(self, user_id: str, tokens: int) -> Outcome:
        """Book a slice for `user_id` and admit the request that asked from it.

        The user's last lease ends here: its rest goes back in the same atomic step (`back`), so a
        request its slice cannot cover finds the room the slice held (and a late timer costs nothing).
        """
        try:
            want = self._want(user_id, tokens)
            last, back = self._leases.get(user_id), None
            if last is not None and not last.ended:
                last.ended = True
                if last.requests or last.tokens:
                    back = (last.second, -last.requests, -last.tokens)
                last.requests = last.tokens = 0
            started = self._local()
            try:
                got = await within(
                    self.budget.rate_take(user_id, want, None if self._clock is None else self._clock(), back),
                    self.timeout,
                    lambda late: self._give_back(user_id, late),
                )
            except Exception as exc:  # never fail the request: the policy decides
                # (a rest that may not have gone back stays counted until it leaves the window: never too many)
                self._errors.failed(exc)
                return STORE_FAILED
            self._saw_backend_at(got)
            if self._errors.failing:
                self._errors.recovered()
            if isinstance(got, RateLimited):
                return got
            if got.now - self._swept_at >= SWEEP_SECONDS:
                self._swept_at, self._sweep_due = got.now, True
                self._settler.kick()
            lease = Lease(got.second, started + (got.second + 1 - got.now), got.requests, got.tokens, got.room // SLICE)
            if last is not None and last.second == got.second:  # what this second admitted sizes the next slice
                lease.admitted, lease.spent = last.admitted, last.spent
            self._leases[user_id] = lease
            self._wake_at(lease.deadline)
            # The slice covers the asking request (at least one request and its tokens): its own.
            lease.requests -= 1
            if self.tpm is not None:
                lease.tokens -= tokens
            lease.admitted += 1
            lease.spent += tokens
            return lease.second, tokens
        finally:
            del self._taking[user_id]

    def _want(self, user_id: str, tokens: int) -> Want:
        """The slice to ask for: what waits now, or twice what the last second admitted."""
        requests, per_request = self._waiting.get(user_id, 1), tokens
        lease = self._leases.get(user_id)
        if lease is not None and lease.admitted and self._local() < lease.deadline + 1.0:
            requests = max(requests, GROWTH * lease.admitted)
            per_request = max(tokens, lease.spent // lease.admitted)
        if self.tpm is None:
            return Want(requests, 0, 0, self.rpm, None)
        return Want(requests, tokens + (requests - 1) * per_request, tokens, self.rpm, self.tpm)

    def _give_back(self, user_id: str, late: Grant | RateLimited) -> None:
        """A slice booked after its take was given up on: nobody spends it (the rest it took back stays back)."""
        if isinstance(late, Grant):
            self._saw_backend_at(late)
            self._settler.add(user_id, late.second, -late.requests, -late.tokens)

    def _saw_backend_at(self, got: Grant | RateLimited) -> None:
        if isinstance(got, Grant):
            # (read after the answer came: a little behind the backend, so a correction is never dropped early)
            self._offset = got.now - self._local()

    def _backend_now(self) -> float:
        """The backend's clock as the last take saw it (before any: the wall clock, which backends keep)."""
        if self._clock is not None:
            return self._clock()
        return time.time() if self._offset is None else self._local() + self._offset

    def _end(self, user_id: str, lease: Lease) -> None:
        """Hand back what `lease` did not spend (or book what it spent past its slice), in the background."""
        lease.ended = True
        self._settler.add(user_id, lease.second, -lease.requests, -lease.tokens)
        lease.requests = lease.tokens = 0

    def _wake_at(self, at: float) -> None:
        if at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(max(0.0, at - self._local()), self.reap)

    async def _send(self, batch: Corrections) -> None:
        if batch:
            await self.budget.rate_correct([(user, second, r, t) for (user, second), (r, t) in batch.items()])
        if self._sweep_due:
            self._sweep_due = False
            await self.budget.rate_sweep(None if self._clock is None else self._clock())
