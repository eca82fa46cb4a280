"""The in-process QuotaLedger (one process) behind the billing protocol, and the lease settings."""

from __future__ import annotations

import pytest

from gateway.billing.ledger import InProcessLedger
from gateway.billing.protocols import QuotaLedger, Reservation
from gateway.quota import Ledger, Refusal
from gateway.settings import ConfigError, settings_from_env
from gateway.store.sqlite import SqliteStore

OUT = "claude_output_tokens"


async def test_in_process_ledger_reserves_settles_and_reloads(store: SqliteStore) -> None:
    ledger: QuotaLedger = InProcessLedger(Ledger(store, {OUT: 100}))
    first = await ledger.reserve("u", {OUT: 64})
    assert isinstance(first, Reservation) and first.user_id == "u"
    assert await ledger.reserve("u", {OUT: 64}) == Refusal(meter=OUT, needed=64, remaining=36)
    ledger.settle(first, {OUT: 15})
    ledger.stored([])
    snap = await ledger.snapshot("u")
    assert (snap.meter(OUT).credited, snap.meter(OUT).consumed, snap.meter(OUT).reserved) == (100, 15, 0)
    ledger.invalidate("u")
    assert (await ledger.snapshot("u")) is snap  # reloaded in place
    assert isinstance(await ledger.reserve("u", {OUT: 85}), Reservation)
    assert await ledger.reserve("u", {OUT: 0}) == Refusal(meter=OUT, needed=0, remaining=0)


def test_lease_settings_from_env() -> None:
    s = settings_from_env({"GATEWAY_LEASE_FRACTION": "0.5", "GATEWAY_HEARTBEAT_STALE_SECONDS": "6"}, load_file=False)
    assert (s.lease_fraction, s.heartbeat_seconds, s.heartbeat_stale_seconds) == (0.5, 1.0, 6.0)
    with pytest.raises(ConfigError, match="GATEWAY_LEASE_FRACTION must be between 0 and 1"):
        settings_from_env({"GATEWAY_LEASE_FRACTION": "1.5"}, load_file=False)
    with pytest.raises(ConfigError, match="at least 3 x GATEWAY_HEARTBEAT_SECONDS"):
        settings_from_env({"GATEWAY_HEARTBEAT_STALE_SECONDS": "2"}, load_file=False)


async def test_shared_quota_is_built_from_the_settings(store: SqliteStore) -> None:
    from dataclasses import replace

    from gateway.billing.keeper import shared_quota
    from gateway.settings import FileConfig, Settings

    s = replace(Settings(), lease_fraction=0.5, heartbeat_seconds=0.5, file=FileConfig(plan={OUT: 100}))
    ledger, keeper = shared_quota(s, store, store, "o1", journal_dir=None, recover=None, on_invalidation=None)
    await keeper.start()
    try:
        res = await ledger.reserve("u", {OUT: 10})
        assert isinstance(res, Reservation)
        assert await store.lease_totals("u") == {OUT: 50}  # half of the plan's 100
        assert (keeper.heartbeat, keeper.stale, keeper.idle) == (0.5, 10.0, 5.0)
        ledger.settle(res, {})  # (a request still in flight at shutdown keeps its reservation leased)
    finally:
        await keeper.close()
    assert await store.lease_totals("u") == {}
