"""The one check of the admin token, with failures counted per client address so it cannot be guessed
at speed.

Every check of the admin token (the admin API's bearer, `/metrics` behind it, the dashboard's
sign-in form) counts a failure against the client's address. After `limit` failures within
`window` seconds the address is refused (429, `Retry-After`) until its oldest failure leaves the
window, even with the right token: otherwise a guess made while refused would still tell right
from wrong. Counted per process, so N workers give an address N x `limit` tries per window:
nothing against a random token, and no store round trip on a path an attacker drives.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

LIMIT = 10
WINDOW_SECONDS = 600.0
MAX_ADDRESSES = 10_000  # a flood from many addresses forgets the oldest, it does not grow memory


class TokenCheck(StrEnum):
    OK = "ok"
    MISSING = "missing"  # no token given: not a guess, not counted
    WRONG = "wrong"
    TOO_MANY = "too_many"  # this address guessed wrong too often: `retry_after` says when to try again


@dataclass(frozen=True, slots=True)
class Checked:
    result: TokenCheck
    retry_after: int = 0


class AdminAttempts:
    def __init__(
        self,
        limit: int = LIMIT,
        window: float = WINDOW_SECONDS,
        *,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}  # oldest address first (insertion order)

    def check(self, token: str, given: str, address: str) -> Checked:
        """Whether `given` is the admin token `token` (compared in constant time; an empty `token`, the
        admin API and dashboard being off, matches nothing), counting a wrong one against `address`."""
        if not given:
            return Checked(TokenCheck.MISSING)
        wait = self.retry_after(address)
        if wait is not None:
            return Checked(TokenCheck.TOO_MANY, wait)
        if not token or not hmac.compare_digest(given.encode(), token.encode()):
            self.failed(address)
            return Checked(TokenCheck.WRONG)
        self.succeeded(address)
        return Checked(TokenCheck.OK)

    def retry_after(self, address: str) -> int | None:
        """Whole seconds until `address` may try again, or None when it may try now."""
        failures = self._failures.get(address)
        if failures is None:
            return None
        horizon = self._clock() - self.window
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        if len(failures) < self.limit:
            return None
        return max(1, math.ceil(failures[0] - horizon))

    def failed(self, address: str) -> None:
        failures = self._failures.pop(address, None)
        if failures is None:
            failures = deque(maxlen=self.limit)
            while len(self._failures) >= self.max_addresses:
                del self._failures[next(iter(self._failures))]
        failures.append(self._clock())
        self._failures[address] = failures  # re-inserted: most recently failing last

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


def client_address(scope_client: tuple[str, int] | None) -> str:
    """The TCP peer's address: the server reads no proxy headers, so behind a reverse proxy every
    client is the proxy (README, "Admin dashboard")."""
    return scope_client[0] if scope_client else "?"
