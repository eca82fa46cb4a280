"""Failed admin-token checks per address: refused after the limit until the oldest leaves the window."""

from __future__ import annotations

from gateway.admin_attempts import AdminAttempts, Checked, TokenCheck


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_limit_th_failure_refuses_until_the_oldest_leaves_the_window() -> None:
    clock = Clock()
    a = AdminAttempts(limit=3, window=60.0, clock=clock)
    for _ in range(2):
        a.failed("10.0.0.1")
        clock.now += 10
    assert a.retry_after("10.0.0.1") is None  # two failures: may try again
    a.failed("10.0.0.1")  # failures at 1000, 1010, 1020
    assert a.retry_after("10.0.0.1") == 40  # the one at 1000 leaves at 1060
    assert a.retry_after("10.0.0.2") is None  # another address is not refused
    clock.now = 1059.5
    assert a.retry_after("10.0.0.1") == 1
    clock.now = 1060.0
    assert a.retry_after("10.0.0.1") is None  # two failures left in the window
    a.failed("10.0.0.1")
    assert a.retry_after("10.0.0.1") == 10  # the one at 1010 leaves at 1070


def test_a_success_forgets_the_address() -> None:
    a = AdminAttempts(limit=2, window=60.0, clock=Clock())
    a.failed("x")
    a.succeeded("x")
    a.failed("x")
    assert a.retry_after("x") is None


def test_memory_is_bounded_by_forgetting_the_least_recently_failing() -> None:
    a = AdminAttempts(limit=1, window=60.0, max_addresses=2, clock=Clock())
    a.failed("a")
    a.failed("b")
    a.failed("a")  # a failed last: b is the oldest now
    a.failed("c")
    assert a.retry_after("b") is None
    assert a.retry_after("a") == 60 and a.retry_after("c") == 60


def test_check_compares_counts_and_refuses() -> None:
    a = AdminAttempts(limit=2, window=60.0, clock=Clock())
    assert a.check("secret", "", "x") == Checked(TokenCheck.MISSING)  # no guess: not counted
    assert a.check("secret", "secret", "x") == Checked(TokenCheck.OK)
    assert a.check("", "", "x") == Checked(TokenCheck.MISSING)
    assert a.check("", "anything", "x") == Checked(TokenCheck.WRONG)  # no admin token: nothing matches
    assert a.check("secret", "guess", "x") == Checked(TokenCheck.WRONG)
    assert a.check("secret", "secret", "x") == Checked(TokenCheck.TOO_MANY, 60)  # even the right one
    assert a.check("secret", "secret", "y") == Checked(TokenCheck.OK)
