"""The per-user rate limiter on a fake clock: windows, refusals, Retry-After, settling, idle users."""

from __future__ import annotations

from gateway.ratelimit import limiter as ratelimit
from gateway.ratelimit.limiter import RateLimiter


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_requests_per_minute_refuses_then_admits_when_the_oldest_bucket_leaves() -> None:
    clock = Clock(1000.2)
    rl = RateLimiter(3, None, clock)
    assert [(await rl.acquire("u", 0))[0] for _ in range(2)] == [None, None]
    clock.now = 1010.5
    assert (await rl.acquire("u", 0))[0] is None
    refused, ticket = await rl.acquire("u", 0)
    assert refused is not None and ticket is None
    assert (refused.reason, refused.retry_after) == ("requests", 50)  # second 1000 leaves at 1060
    assert (await rl.acquire("other", 0))[0] is None  # per user
    clock.now = 1059.99
    assert (await rl.acquire("u", 0))[0] is not None
    clock.now = 1060.0
    assert (await rl.acquire("u", 0))[0] is None  # two freed, one taken
    assert (await rl.acquire("u", 0))[0] is None
    assert (await rl.acquire("u", 0))[0] is not None


async def test_retry_after_a_requests_refusal_waits_for_the_tokens_too() -> None:
    # Refused for requests, told when a request leaves; but the tokens did not fit then either: the
    # SDK's retry was refused again. Retry-After is when the request fits both limits.
    clock = Clock(1000.0)
    rl = RateLimiter(3, 100, clock)
    for at in (1000.0, 1010.0, 1020.0):
        clock.now = at
        assert (await rl.acquire("u", 30))[0] is None
    clock.now = 1030.0
    assert await rl.acquire("u", 50) == (ratelimit.RateLimited("requests", 40), None)  # not 30: 60 + 50 > 100
    clock.now = 1069.9
    assert (await rl.acquire("u", 50))[0] is not None
    clock.now = 1070.0
    assert (await rl.acquire("u", 50))[0] is None


async def test_tokens_are_reserved_then_settled_to_the_actual_count() -> None:
    clock = Clock()
    rl = RateLimiter(None, 100, clock)
    _, first = await rl.acquire("u", 80)  # estimate
    refused, _ = await rl.acquire("u", 30)
    assert refused is not None and refused.reason == "tokens" and refused.retry_after == 60
    rl.settle("u", first, 10)  # it used 10
    assert (await rl.acquire("u", 30))[0] is None
    assert (await rl.acquire("u", 70))[0] is not None  # 40 + 70 > 100
    assert (await rl.acquire("u", 60))[0] is None  # 40 + 60 fits exactly


async def test_a_lone_oversized_request_passes_and_settling_an_expired_ticket_is_ignored() -> None:
    clock = Clock()
    rl = RateLimiter(None, 100, clock)
    _, ticket = await rl.acquire("u", 500)
    assert ticket is not None
    clock.now += 61
    rl.settle("u", ticket, 5)
    assert (await rl.acquire("u", 100))[0] is None
    assert (await rl.acquire("u", 1))[0] is not None


async def test_settling_a_ticket_whose_bucket_has_left_the_window_changes_nothing() -> None:
    clock = Clock()
    rl = RateLimiter(None, 100, clock)
    _, ticket = await rl.acquire("u", 500)
    clock.now += 61
    assert (await rl.acquire("u", 0))[0] is None  # drops the first bucket, its 500 tokens with it
    rl.settle("u", ticket, 5)
    assert (await rl.acquire("u", 100))[0] is None
    assert (await rl.acquire("u", 1))[0] is not None


async def test_idle_users_are_forgotten(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ratelimit, "SWEEP_EVERY", 3)
    clock = Clock()
    rl = RateLimiter(10, None, clock)
    await rl.acquire("a", 0)
    await rl.acquire("b", 0)
    clock.now += 61
    await rl.acquire("c", 0)  # the third admission sweeps
    assert set(rl._windows) == {"c"}


async def test_no_limits_no_state() -> None:
    rl = RateLimiter(None, None)
    assert await rl.acquire("u", 10) == (None, None)
    assert rl._windows == {}


async def test_zero_requests_per_minute_refuses_everything() -> None:
    # (a user whose window has no bucket yet: it crashed with an IndexError)
    rl = RateLimiter(0, None, Clock(1000.0))
    assert await rl.acquire("u", 0) == (ratelimit.RateLimited("requests", 60), None)


async def test_a_request_that_needs_no_tokens_is_not_refused_for_tokens() -> None:
    # Unmetered requests (models, count_tokens) count against requests per minute only.
    rl = RateLimiter(60, 100, Clock(1000.0))
    assert (await rl.acquire("u", 500))[0] is None  # a lone over-sized request passes
    assert (await rl.acquire("u", 0))[0] is None
    assert await rl.acquire("u", 1) == (ratelimit.RateLimited("tokens", 60), None)
