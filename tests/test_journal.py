"""The request journal and the recorder: what a crash leaves is stored exactly once at the next start."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.journal import Journal, entries, orphans
from gateway.recording import Recorder, recover, recover_journal
from gateway.store.base import RequestRecord
from gateway.store.sqlite import SqliteStore
from tests.test_store import record


def crash(journal: Journal) -> None:
    """What kill -9 leaves: the files, unlocked, nothing deleted."""
    for seg in journal._segments:
        seg.map.close()  # (the mapping holds the file's lock as the descriptor does)
        os.close(seg.fd)
    journal._segments.clear()


def finished(r: RequestRecord, usage: dict[str, int]) -> RequestRecord:
    r.outcome, r.status_code, r.usage = "ok", 200, usage
    r.finished_at = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)
    return r


async def stored_usage(store: SqliteStore, rid: str) -> dict[str, int]:
    return {e.meter: e.value for e in await store.events_for_request(rid)}


async def test_recovery_stores_finished_exactly_and_estimates_the_unfinished(
    tmp_path: Path, store: SqliteStore
) -> None:
    j = Journal(tmp_path / "j", "host:1:aa")
    j.open()
    done = record("req_done", reservation={"claude_input_tokens": 50, "claude_output_tokens": 100})
    j.begin(done)
    j.finish(finished(done, {"claude_input_tokens": 12, "claude_output_tokens": 9}))
    cut = record("req_cut", reservation={"claude_input_tokens": 50, "claude_cache_read_tokens": 50})
    j.begin(cut)
    crash(j)

    assert await recover(store, tmp_path / "j", "me") == 1
    assert await stored_usage(store, "req_done") == {"claude_input_tokens": 12, "claude_output_tokens": 9}
    assert await stored_usage(store, "req_cut") == {"claude_input_tokens": 50}  # input estimated once
    assert list((tmp_path / "j").iterdir()) == []
    # a second start finds nothing to do
    assert await recover(store, tmp_path / "j", "me") == 0
    assert await stored_usage(store, "req_done") == {"claude_input_tokens": 12, "claude_output_tokens": 9}


async def test_recovery_stores_a_dead_process_journal_in_batches(tmp_path: Path, store: SqliteStore) -> None:
    # A journal left by a long outage holds many requests: a transaction each held the start (or
    # a keeper's settling) for minutes. Finished and estimated ones go in a few batches.
    j = Journal(tmp_path / "j", "host:1:aa")
    j.open()
    for n in range(2500):
        r = record(f"req_{n}", reservation={"claude_output_tokens": 10})
        j.begin(r)
        if n % 5:
            j.finish(finished(r, {"claude_output_tokens": 3}))
    crash(j)
    batches: list[int] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def finish_request(self, r: RequestRecord) -> None:
            batches.append(1)
            await store.finish_request(r)

        async def finish_requests(self, records: list[RequestRecord]) -> None:
            batches.append(len(records))
            await store.finish_requests(records)

    assert await recover_journal(Counting(), tmp_path / "j") == 500  # type: ignore[arg-type]
    assert batches == [2000, 500]
    december = (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert await store.consumed("u", *december) == {"claude_output_tokens": 2000 * 3 + 500 * 10}


async def test_a_request_stored_before_the_crash_is_not_estimated_again(tmp_path: Path, store: SqliteStore) -> None:
    # Its begin sits in a segment kept alive by another request; its finish was in a segment already gone.
    j = Journal(tmp_path / "j", "p", segment_bytes=1)
    j.open()
    r = record("req_a")
    b = j.begin(r)
    f = j.finish(finished(r, {"claude_output_tokens": 7}))
    await store.finish_request(r)
    j.begin(record("req_open"))
    assert b is not None and f is not None
    b.pending += 1  # as if something else in req_a's begin segment were still pending
    j.stored([b, f])
    assert b.path.exists() and not f.path.exists()
    crash(j)

    assert await recover(store, tmp_path / "j", "me") == 1  # only req_open
    assert await stored_usage(store, "req_a") == {"claude_output_tokens": 7}


def test_a_live_process_segments_are_not_touched(tmp_path: Path) -> None:
    live = Journal(tmp_path, "live")
    live.open()
    live.begin(record("req_live"))
    found = orphans(tmp_path)
    assert found.finished == [] and found.unfinished == [] and found.files == []
    live.close()


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    j = Journal(tmp_path, "p")
    j.open()
    j.begin(record("req_ok"))
    seg = j._current
    assert seg is not None
    torn = b'["B","req_torn","u"'  # the copy the crash cut
    seg.map[seg.size : seg.size + len(torn)] = torn
    crash(j)
    found = orphans(tmp_path)
    assert [r.id for r in found.unfinished] == ["req_ok"]
    found.discard()


def test_segments_roll_and_go_once_everything_in_them_is_stored(tmp_path: Path) -> None:
    j = Journal(tmp_path, "p", segment_bytes=200)
    j.open()
    segs = []
    for i in range(6):
        r = record(f"req_{i}")
        segs.append((j.begin(r), j.finish(finished(r, {"claude_output_tokens": 1}))))
    assert len(list(tmp_path.iterdir())) > 2
    for b, f in segs:
        j.stored([b, f])
    assert len(list(tmp_path.iterdir())) == 1  # only the one being written
    j.close()
    assert list(tmp_path.iterdir()) == []


def test_a_sealed_segment_holds_its_lines_only_and_a_long_line_gets_a_segment_of_its_own(tmp_path: Path) -> None:
    j = Journal(tmp_path, "p", segment_bytes=4096)
    j.open()
    first = j.begin(record("req_a"))
    long = record("req_long", reservation={f"meter_{i}": i for i in range(400)})  # a line over 4096 bytes
    second = j.begin(long)
    assert first is not None and second is not None and first is not second
    assert first.sealed and first.path.stat().st_size == first.size  # the unused tail cut
    assert second.capacity == second.size > 4096
    third = j.begin(record("req_c"))  # the long line filled its segment: the next rolls again
    assert third is not None and third is not second and third.capacity == 4096
    assert third.path.stat().st_size == 4096  # its blocks are reserved up front; the tail reads as NULs
    assert [e[1] for e in entries(third.path)] == ["req_c"]
    assert [e[1] for p in sorted(tmp_path.iterdir()) for e in entries(p)] == ["req_a", "req_long", "req_c"]
    j.close()


def test_a_segment_that_cannot_be_made_refuses_the_line_and_changes_nothing(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", "p", segment_bytes=200)
    j.open()
    current = j._current
    assert current is not None and j.begin(record("req_a")) is current
    j.directory = tmp_path / "not-a-dir"
    j.directory.write_bytes(b"")  # a new segment cannot be created there (as on a full disk: OSError)
    with pytest.raises(OSError):
        j.begin(record("req_b"))  # no room left for it in a 200-byte segment: it needs a new one
    assert j._current is current and not current.sealed and current.pending == 1
    j.directory = tmp_path / "j"
    assert j.begin(record("req_c")) is not current  # it can again
    assert [e[1] for p in sorted((tmp_path / "j").iterdir()) for e in entries(p)] == ["req_a", "req_c"]
    j.close()


def test_a_journal_that_cannot_start_refuses_lines_until_it_can(tmp_path: Path) -> None:
    blocker = tmp_path / "disk"
    blocker.write_bytes(b"")  # its directory cannot be made (as on a full disk: OSError)
    j = Journal(blocker / "j", "p")
    j.open()  # logs, does not raise: the gateway starts and refuses billed requests
    with pytest.raises(OSError):
        j.begin(record("req_a"))
    blocker.unlink()  # space again
    seg = j.begin(record("req_b"))
    assert seg is not None and [e[1] for e in entries(seg.path)] == ["req_b"]
    j.close()


def test_a_segment_name_taken_by_a_predecessor_is_skipped_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "p.000002.journal").write_bytes(b'["B","req_old"]\n')  # a dead process with the same owner id
    j = Journal(tmp_path, "p", segment_bytes=200)
    j.open()
    j.begin(record("req_a"))
    seg = j.begin(record("req_b"))  # needs a second segment: number 2 is taken, so 3
    assert seg is not None and seg.path.name == "p.000003.journal"
    assert (tmp_path / "p.000002.journal").read_bytes() == b'["B","req_old"]\n'
    j.close()


class FlakyStore(SqliteStore):
    """Fails the first `n` finishes: a locked or full database."""

    def __init__(self, path: str, n: int) -> None:
        super().__init__(path)
        self.fail = n
        self.calls = 0

    async def finish_requests(self, records: Sequence[RequestRecord]) -> None:
        self.calls += 1
        if self.fail > 0:
            self.fail -= 1
            raise OSError("disk I/O error")
        await super().finish_requests(records)


async def test_recorder_batches_retries_and_keeps_the_journal_until_stored(tmp_path: Path) -> None:
    store = FlakyStore(str(tmp_path / "r.db"), n=2)
    await store.open()
    await store.migrate()
    j = Journal(tmp_path / "j", "p", segment_bytes=1)
    j.open()
    woken: list[int] = []
    rec = Recorder(store, j, woken.append, linger=0.01)
    try:
        for i in range(5):
            r = record(f"req_{i}")
            b = j.begin(r)
            finished(r, {"claude_output_tokens": i})
            rec.add(r, [b, j.finish(r)])
        await rec.close()
        assert store.calls == 7  # the batch failed, then one by one: the first of those failed and was retried
        assert await store.finished_ids([f"req_{i}" for i in range(5)]) == {f"req_{i}" for i in range(5)}
        assert sum(woken) == 4  # req_0 had no usage: no event
        await asyncio.sleep(0)
        assert [p.name for p in (tmp_path / "j").iterdir()] == [j._current.path.name]  # type: ignore[union-attr]
    finally:
        j.close()
        await store.close()


class DownStore(SqliteStore):
    """Takes nothing while `down` (a locked or unreachable database)."""

    down = True
    calls = 0

    async def finish_requests(self, records: Sequence[RequestRecord]) -> None:
        self.calls += 1
        if self.down:
            raise OSError("database is locked")
        await super().finish_requests(records)


async def open_store(store: SqliteStore) -> SqliteStore:
    await store.open()
    await store.migrate()
    return store


async def test_recorder_keeps_everything_while_the_store_is_down(tmp_path: Path) -> None:
    store = await open_store(DownStore(str(tmp_path / "d.db")))
    j = Journal(tmp_path / "j", "p")
    j.open()
    rec = Recorder(store, j, linger=0.001, max_attempts=2, retry_seconds=0.001)
    try:
        for i in range(3):
            r = finished(record(f"req_{i}"), {"claude_output_tokens": 1})
            rec.add(r, [j.begin(r), j.finish(r)])
        deadline = asyncio.get_running_loop().time() + 10
        while store.calls < 20:  # many more tries than max_attempts: nothing is given up
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        store.down = False
        await rec.close()
        assert await store.finished_ids(["req_0", "req_1", "req_2"]) == {"req_0", "req_1", "req_2"}
    finally:
        j.close()
        await store.close()


async def test_shutdown_with_the_store_down_leaves_the_journal_for_the_next_start(tmp_path: Path) -> None:
    store = await open_store(DownStore(str(tmp_path / "d.db")))
    j = Journal(tmp_path / "j", "p")
    j.open()
    rec = Recorder(store, j, linger=0.001, retry_seconds=0.001)
    r = finished(record("req_x"), {"claude_output_tokens": 4})
    rec.add(r, [j.begin(r), j.finish(r)])
    await rec.close(grace_seconds=0.2)
    j.close()  # the segment is kept: its request was never stored
    store.down = False
    try:
        assert await recover(store, tmp_path / "j", "next") == 0
        assert await stored_usage(store, "req_x") == {"claude_output_tokens": 4}
    finally:
        await store.close()
