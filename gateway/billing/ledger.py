"""The in-process `QuotaLedger`: `quota.Ledger` behind the billing protocol (one process)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gateway.billing.protocols import Reservation
from gateway.quota import Ledger, Refusal, UserQuota
from gateway.store.base import RequestRecord


class InProcessLedger:
    """Implements `gateway.billing.protocols.QuotaLedger` for one gateway process: the whole
    balance lives in this process's memory, so `stored` has nothing to do."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def reserve(self, user_id: str, amounts: Mapping[str, int]) -> Reservation | Refusal:
        uq = self.ledger.cached(user_id)  # the common case, without a second coroutine
        if uq is None:
            uq = await self.ledger.get(user_id)
        return self.reserve_loaded(user_id, amounts, uq)

    def reserve_held(self, user_id: str, amounts: Mapping[str, int]) -> Reservation | Refusal | None:
        uq = self.ledger.cached(user_id)
        return None if uq is None else self.reserve_loaded(user_id, amounts, uq)

    @staticmethod
    def reserve_loaded(user_id: str, amounts: Mapping[str, int], uq: UserQuota) -> Reservation | Refusal:
        """`reserve` on the user's quota already loaded (`Ledger.cached`)."""
        refusal = Ledger.reserve(uq, amounts)
        return refusal if refusal is not None else Reservation(user_id, amounts, uq, uq.period_end)

    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> None:
        uq = reservation.quota
        if reservation.period_end is not None and reservation.period_end <= uq.period_start:
            actual = {}  # reserved in a period that has ended since: the store counts it there, by its start
        Ledger.settle(uq, reservation.amounts, actual)

    def stored(self, records: Sequence[RequestRecord]) -> None:
        pass  # `consumed` moved forward at settle already

    async def snapshot(self, user_id: str) -> UserQuota:
        return await self.ledger.get(user_id)

    def invalidate(self, user_id: str) -> None:
        self.ledger.invalidate(user_id)
