"""The billing owner on fakes: what a refusal takes it gives back, a hold settles once, no HTTP needed."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.billing.ledger import InProcessLedger
from gateway.billing.owner import BillingOwner, Hold, RefusalKind, Refused, Result
from gateway.billing.protocols import Reservation
from gateway.journal import Journal, Segment
from gateway.metering import Usage
from gateway.outcomes import Outcome
from gateway.quota import Ledger, Refusal, UserQuota
from gateway.ratelimit.limiter import RateLimited, RateLimiter
from gateway.recording import Recorder
from gateway.store.base import RequestRecord
from gateway.store.sqlite import SqliteStore
from tests.conftest import poll_until
from tests.test_store import record

IN, OUT, CACHE_READ = "claude_input_tokens", "claude_output_tokens", "claude_cache_read_tokens"
CACHE_WRITE, CACHE_WRITE_1H = "claude_cache_write_tokens", "claude_cache_write_1h_tokens"
SEARCHES = "claude_web_searches"
NOW = datetime(2026, 12, 2, tzinfo=UTC)


class FakeLimiter:
    """Hands out tickets and remembers every settle."""

    def __init__(self, refuse: RateLimited | None = None) -> None:
        self.refuse = refuse
        self.acquired: list[tuple[str, int, object]] = []
        self.settled: list[tuple[str, object | None, int]] = []

    async def acquire(self, user_id: str, tokens: int) -> tuple[RateLimited | None, object | None]:
        if self.refuse is not None:
            return self.refuse, None
        ticket = object()
        self.acquired.append((user_id, tokens, ticket))
        return None, ticket

    def settle(self, user_id: str, ticket: object | None, actual_tokens: int) -> None:
        self.settled.append((user_id, ticket, actual_tokens))


class FakeLedger:
    """Reserves on a throwaway quota unless told to refuse (or to fail: the store down); remembers
    what is held and settled."""

    def __init__(
        self, refuse: Refusal | None = None, fail: BaseException | None = None, hang: asyncio.Event | None = None
    ) -> None:
        self.refuse = refuse
        self.fail = fail
        self.hang = hang  # the store does not answer until it is set
        self.asked = 0
        self.held: list[Reservation] = []
        self.settled: list[tuple[Reservation, dict[str, int]]] = []
        self.stored_ids: list[str] = []

    def reserve_held(self, user_id: str, amounts: Mapping[str, int]) -> None:
        return None  # (always asks the store)

    async def reserve(self, user_id: str, amounts: Mapping[str, int]) -> Reservation | Refusal:
        self.asked += 1
        if self.hang is not None:
            await self.hang.wait()
        if self.fail is not None:
            raise self.fail
        if self.refuse is not None:
            return self.refuse
        reservation = Reservation(user_id, amounts, UserQuota(user_id, NOW, NOW, {}, "plan"))
        self.held.append(reservation)
        return reservation

    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> None:
        self.held.remove(reservation)  # raises if settled twice
        self.settled.append((reservation, dict(actual)))

    def stored(self, records: object) -> None:
        raise AssertionError("the owner never reports stores: the recorder does")

    async def snapshot(self, user_id: str) -> UserQuota:
        raise AssertionError("not used by the owner")

    def invalidate(self, user_id: str) -> None:
        raise AssertionError("not used by the owner")


class FakeJournal:
    def __init__(self, fail_begin: bool | Exception = False, fail_finish: bool = False) -> None:
        self.fail_begin, self.fail_finish = fail_begin, fail_finish
        self.begun: list[str] = []
        self.finished: list[str] = []

    def begin(self, r: RequestRecord) -> Segment | None:
        if isinstance(self.fail_begin, Exception):
            raise self.fail_begin
        if self.fail_begin:
            raise OSError(28, "No space left on device")
        self.begun.append(r.id)
        return None

    def finish(self, r: RequestRecord) -> Segment | None:
        if self.fail_finish:
            raise OSError(28, "No space left on device")
        self.finished.append(r.id)
        return None


class FakeSink:
    def __init__(self) -> None:
        self.added: list[tuple[RequestRecord, list[Segment | None]]] = []

    def add(self, r: RequestRecord, segments: list[Segment | None]) -> None:
        self.added.append((r, segments))


class FakeRefusals:
    def __init__(self) -> None:
        self.counted: list[tuple[int, str]] = []

    def count(self, status: int, reason: str) -> None:
        self.counted.append((status, reason))


def owner(
    limiter: FakeLimiter | None = None,
    ledger: FakeLedger | None = None,
    journal: FakeJournal | None = None,
    refusals: FakeRefusals | None = None,
) -> tuple[BillingOwner, FakeLimiter, FakeLedger, FakeJournal, FakeSink]:
    limiter, ledger, journal = limiter or FakeLimiter(), ledger or FakeLedger(), journal or FakeJournal()
    sink = FakeSink()
    billing = BillingOwner(ledger, limiter, journal, sink, refusals=refusals or FakeRefusals())
    return billing, limiter, ledger, journal, sink


async def test_a_rate_limited_request_takes_nothing() -> None:
    billing, limiter, ledger, journal, sink = owner(limiter=FakeLimiter(RateLimited("tokens", 7)))
    refused = await billing.begin(record("req_a"), 100)
    assert refused == Refused(RefusalKind.RATE_LIMITED, rate=RateLimited("tokens", 7))
    assert (limiter.acquired, ledger.held, ledger.settled, journal.begun, sink.added) == ([], [], [], [], [])


async def test_a_reservation_that_fails_gives_back_the_rate_ticket() -> None:
    # The quota store down while reserving: nothing ran, so the tokens estimated on the rate limit
    # must not stay counted for the rest of the minute; the client gets a 503 it can retry.
    refusals = FakeRefusals()
    billing, limiter, ledger, journal, sink = owner(
        ledger=FakeLedger(fail=ConnectionError("store down")), refusals=refusals
    )
    assert await billing.begin(record("req_a"), 100) == Refused(RefusalKind.STORE_UNAVAILABLE)
    [(user, tokens, ticket)] = limiter.acquired
    assert (user, tokens) == ("u", 100) and limiter.settled == [(user, ticket, 0)]
    assert (ledger.held, journal.begun, sink.added) == ([], [], [])
    assert refusals.counted == [(503, "store_unavailable")]


async def test_a_store_that_does_not_answer_is_waited_for_a_bounded_time() -> None:
    # A database that stops answering (a partition, a failover) must not hold the request: it is
    # refused at the deadline, and the reservation the store grants later is given back at once.
    answer = asyncio.Event()
    ledger = FakeLedger(hang=answer)
    limiter = FakeLimiter()
    billing = BillingOwner(ledger, limiter, FakeJournal(), FakeSink(), refusals=FakeRefusals(), store_timeout=0.05)
    refused = await asyncio.wait_for(billing.begin(record("req_a", reservation={OUT: 10}), 40), 5)
    assert refused == Refused(RefusalKind.STORE_UNAVAILABLE)
    [(_, _, ticket)] = limiter.acquired
    assert limiter.settled == [("u", ticket, 0)] and ledger.settled == []
    answer.set()
    [(late, actual)] = await poll_until(lambda: ledger.settled)
    assert (late.amounts, actual, ledger.held) == ({OUT: 10}, {}, [])


async def test_a_request_cancelled_while_the_store_is_slow_gives_back_what_it_is_granted() -> None:
    answer = asyncio.Event()
    ledger = FakeLedger(hang=answer)
    billing = BillingOwner(ledger, FakeLimiter(), FakeJournal(), FakeSink(), refusals=FakeRefusals())
    begun = asyncio.create_task(billing.begin(record("req_a", reservation={OUT: 10}), 40))
    await poll_until(lambda: ledger.asked)  # the request is waiting on the store
    begun.cancel()
    with pytest.raises(asyncio.CancelledError):
        await begun
    answer.set()
    [(late, actual)] = await poll_until(lambda: ledger.settled)
    assert (late.amounts, actual, ledger.held) == ({OUT: 10}, {}, [])


async def test_a_quota_refusal_gives_back_the_rate_ticket() -> None:
    billing, limiter, ledger, journal, _ = owner(ledger=FakeLedger(Refusal(OUT, needed=10, remaining=3)))
    refused = await billing.begin(record("req_a", reservation={OUT: 10}), 40)
    assert refused == Refused(RefusalKind.QUOTA, quota=Refusal(OUT, 10, 3))
    [(_, tokens, ticket)] = limiter.acquired
    assert tokens == 40
    assert limiter.settled == [("u", ticket, 0)]  # released: it counts no tokens
    assert (ledger.held, journal.begun) == ([], [])


async def test_a_journal_failure_gives_back_the_reservation_and_the_ticket() -> None:
    billing, limiter, ledger, _, sink = owner(journal=FakeJournal(fail_begin=True))
    refused = await billing.begin(record("req_a", reservation={OUT: 10}), 40)
    assert refused == Refused(RefusalKind.UNRECORDABLE)
    assert ledger.held == [] and [actual for _, actual in ledger.settled] == [{}]
    assert limiter.settled == [("u", limiter.acquired[0][2], 0)]
    assert sink.added == []


async def test_a_begin_the_journal_cannot_encode_gives_back_all_and_raises() -> None:
    # Not an OS error (orjson refuses what it cannot write): an error answer, but nothing stays taken.
    billing, limiter, ledger, _, sink = owner(journal=FakeJournal(fail_begin=TypeError("Integer exceeds 64-bit range")))
    with pytest.raises(TypeError):
        await billing.begin(record("req_a", reservation={OUT: 10}), 40)
    assert ledger.held == [] and [actual for _, actual in ledger.settled] == [{}]
    assert limiter.settled == [("u", limiter.acquired[0][2], 0)]
    assert sink.added == []


async def test_each_refusal_is_counted_by_status_and_reason() -> None:
    refusals = FakeRefusals()
    billing, limiter, ledger, journal, _ = owner(refusals=refusals)
    limiter.refuse = RateLimited("tokens", 7)
    await billing.begin(record("req_a"), 100)
    limiter.refuse = RateLimited("requests", 2)
    await billing.admit("u")
    limiter.refuse = None
    ledger.refuse = Refusal(OUT, needed=10, remaining=3)
    await billing.begin(record("req_b", reservation={OUT: 10}), 40)
    ledger.refuse = None
    journal.fail_begin = True
    await billing.begin(record("req_c"), 1)
    journal.fail_begin = False
    assert isinstance(await billing.begin(record("req_d"), 1), Hold)  # admitted: not counted
    assert await billing.admit("u") is None
    assert refusals.counted == [(429, "tokens"), (429, "requests"), (402, "quota"), (503, "unrecordable")]


async def test_finish_settles_exactly_once() -> None:
    billing, limiter, ledger, journal, sink = owner()
    r = record("req_a", reservation={IN: 50, OUT: 100})
    hold = await billing.begin(r, 150)
    assert isinstance(hold, Hold) and ledger.held == [hold.reservation] and journal.begun == ["req_a"]
    usage = Usage({IN: 12, OUT: 30, CACHE_READ: 0}, raw={"output_tokens": 30}, final=True, seen=True)
    hold.finish(Result(200, Outcome.OK, usage))
    hold.finish(Result(500, Outcome.GATEWAY_ERROR, None, estimated=True))  # e.g. a finally after a finish
    assert ledger.held == [] and [actual for _, actual in ledger.settled] == [{IN: 12, OUT: 30}]
    assert limiter.settled == [("u", hold.ticket, 42)]
    assert journal.finished == ["req_a"]
    assert [(x.id, segments) for x, segments in sink.added] == [("req_a", [None, None])]
    assert (r.status_code, r.outcome, r.usage, r.usage_raw, r.estimated) == (
        200,
        "ok",
        {IN: 12, OUT: 30},
        {"output_tokens": 30},
        False,
    )
    assert r.finished_at is not None and type(r.outcome) is str  # stored as the plain string


async def test_no_usage_seen_bills_the_reservation_as_plain_input_and_output() -> None:
    billing, limiter, ledger, _, _ = owner()
    r = record("req_a", reservation={IN: 50, CACHE_READ: 50, OUT: 100})
    hold = await billing.begin(r, 150)
    assert isinstance(hold, Hold)
    hold.finish(Result(200, Outcome.CLIENT_DISCONNECTED, Usage({IN: 0, OUT: 0}), estimated=True))
    assert (r.usage, r.estimated, r.outcome) == ({IN: 50, OUT: 100}, True, "client_disconnected")
    assert [actual for _, actual in ledger.settled] == [{IN: 50, OUT: 100}]
    assert limiter.settled[0][2] == 150


async def test_no_usage_seen_bills_the_reserved_searches_but_no_1h_cache_writes() -> None:
    # The searches reserved are the most the provider may have charged, like output; the 1h part of
    # cache writes would bill a premium on writes the estimate does not bill.
    billing, limiter, ledger, _, _ = owner()
    reserved = {IN: 50, CACHE_WRITE: 50, CACHE_WRITE_1H: 50, CACHE_READ: 50, OUT: 100, SEARCHES: 5}
    r = record("req_a", reservation=reserved)
    hold = await billing.begin(r, 150)
    assert isinstance(hold, Hold)
    hold.finish(Result(200, Outcome.CLIENT_DISCONNECTED, Usage({IN: 0, OUT: 0}), estimated=True))
    assert r.usage == {IN: 50, OUT: 100, SEARCHES: 5}
    assert [actual for _, actual in ledger.settled] == [{IN: 50, OUT: 100, SEARCHES: 5}]
    assert limiter.settled[0][2] == 150  # searches are not tokens


async def test_the_rate_limit_counts_tokens_once_and_no_searches() -> None:
    billing, limiter, _, _, _ = owner()
    hold = await billing.begin(record("req_a"), 10)
    assert isinstance(hold, Hold)
    usage = {IN: 12, OUT: 30, CACHE_WRITE: 100, CACHE_WRITE_1H: 60, SEARCHES: 3}
    hold.finish(Result(200, Outcome.OK, Usage(usage, seen=True, final=True)))
    assert limiter.settled[0][2] == 142  # the 60 1h writes are among the 100 writes


async def test_a_journal_failure_at_finish_still_settles_and_records() -> None:
    billing, limiter, ledger, journal, sink = owner()
    hold = await billing.begin(record("req_a"), 10)
    assert isinstance(hold, Hold)
    journal.fail_finish = True
    hold.finish(Result(200, Outcome.OK, Usage({OUT: 4}, seen=True, final=True)))
    assert [actual for _, actual in ledger.settled] == [{OUT: 4}] and len(limiter.settled) == 1
    assert [segments for _, segments in sink.added] == [[None, None]]  # the begin stays for recovery


async def test_an_unmetered_request_is_admitted_on_the_rate_limit_alone() -> None:
    billing, limiter, ledger, journal, _ = owner()
    assert await billing.admit("u") is None
    assert [(u, tokens) for u, tokens, _ in limiter.acquired] == [("u", 0)]
    limiter.refuse = RateLimited("requests", 3)
    assert await billing.admit("u") == Refused(RefusalKind.RATE_LIMITED, rate=RateLimited("requests", 3))
    assert (ledger.held, journal.begun) == ([], [])


async def test_a_batch_begins_now_and_is_finished_later_by_a_poller(tmp_path: Path, store: SqliteStore) -> None:
    """No HTTP request: one hold for a provider batch, settled from another task once the batch is done."""
    ledger = InProcessLedger(Ledger(store, {OUT: 1000}, clock=lambda: NOW))
    limiter = RateLimiter(None, 10_000)
    journal = Journal(tmp_path / "journal", "host:1:aa")
    journal.open()
    stored: list[list[str]] = []
    recorder = Recorder(store, journal, on_stored=lambda rs: stored.append([r.id for r in rs]), linger=0.001)
    billing = BillingOwner(ledger, limiter, journal, recorder)

    batch = record("batch_1", operation="batch", reservation={IN: 300, OUT: 600})
    hold = await billing.begin(batch, 900)
    assert isinstance(hold, Hold)
    quota = await ledger.snapshot("u")
    assert (quota.meter(OUT).reserved, quota.meter(OUT).remaining) == (600, 400)
    refused = await billing.begin(record("req_2", reservation={OUT: 500}), 500)
    assert isinstance(refused, Refused) and refused.quota == Refusal(OUT, needed=500, remaining=400)

    async def poller() -> None:
        await asyncio.sleep(0)  # later, elsewhere: the batch's results are in
        hold.finish(Result(None, Outcome.OK, Usage({IN: 120, OUT: 480}, final=True, seen=True)))

    await asyncio.create_task(poller())
    await recorder.close()
    journal.close()
    assert stored == [["batch_1"]]
    assert {e.meter: e.value for e in await store.events_for_request("batch_1")} == {IN: 120, OUT: 480}
    quota = await ledger.snapshot("u")
    assert (quota.meter(OUT).reserved, quota.meter(OUT).consumed, quota.meter(IN).reserved) == (0, 480, 0)
    assert limiter._windows["u"].tokens == 600  # the estimate corrected to the actual total
    assert list((tmp_path / "journal").iterdir()) == []  # stored: nothing left to recover
