"""The Polar connection as the overview shows it: probed at most every half minute."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from enum import StrEnum

from gateway.polar.client import PolarAuthError, PolarBilling, PolarBillingError

PROBE_TIMEOUT = 5.0
PROBE_EVERY = 30.0  # a page reload within this reuses the last answer instead of calling Polar again


class Connection(StrEnum):
    OFF = "off"  # no POLAR_ACCESS_TOKEN
    OK = "ok"
    REFUSED = "refused"  # Polar refused the token
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class PolarState:
    connection: Connection
    detail: str
    checked_at: float  # time.time() of the probe


class PolarProbe:
    def __init__(self, polar: PolarBilling | None, environment: str) -> None:
        self._polar = polar
        self._environment = environment
        self._last: PolarState | None = None
        self._lock = asyncio.Lock()

    async def state(self) -> PolarState:
        if self._polar is None:
            return PolarState(Connection.OFF, "POLAR_ACCESS_TOKEN is not set: no sync to Polar", time.time())
        async with self._lock:  # concurrent page loads share one probe
            if self._last is not None and time.time() - self._last.checked_at < PROBE_EVERY:
                return self._last
            self._last = await self._probe(self._polar)
            return self._last

    async def _probe(self, polar: PolarBilling) -> PolarState:
        env = self._environment
        try:
            await asyncio.wait_for(polar.probe(), PROBE_TIMEOUT)
        except PolarAuthError:
            return PolarState(Connection.REFUSED, f"Polar ({env}) refused the access token", time.time())
        except (PolarBillingError, TimeoutError) as exc:
            why = "no answer" if isinstance(exc, TimeoutError) else type(exc).__name__
            return PolarState(Connection.UNREACHABLE, f"Polar ({env}) is unreachable: {why}", time.time())
        return PolarState(Connection.OK, f"connected to Polar ({env})", time.time())
