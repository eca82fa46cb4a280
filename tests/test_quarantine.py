"""A record the store refuses on its own (a data error, not an outage) must not stop recovery: the
others are stored, it goes to the journal's `rejected/` directory verbatim, and the segment goes."""

from __future__ import annotations

import logging
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.journal import Journal, Segment
from gateway.metrics import Metrics
from gateway.recording import Recorder, recover, recover_journal
from gateway.store import Store
from gateway.store.base import RequestRecord
from tests.conftest import poll_until
from tests.support_db import Database
from tests.test_journal import crash, finished, stored_usage
from tests.test_store import record

pytestmark = pytest.mark.both_backends

# Values a store cannot hold, per backend: a status beyond a 64-bit (SQLite) or 32-bit (PostgreSQL)
# integer, and on PostgreSQL a NUL in a text column.
_BAD: dict[str, dict[str, object]] = {
    "status beyond the integer column": {"status_code": 2**63},
    "NUL in a text column": {"model": "m\x00"},
}


_DECEMBER = (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


def _segments(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.journal"))


def _journal_lines(directory: Path, rid: str) -> list[bytes]:
    """The lines of `rid` in the segments of `directory`, as written."""
    return [
        line
        for path in sorted(directory.glob("*.journal"))
        for line in path.read_bytes().rstrip(b"\0").splitlines()
        if f'"{rid}"'.encode() in line
    ]


def _dead_with_a_bad_record(directory: Path, bad: dict[str, object]) -> None:
    """A killed process's journal: two good finished requests around a bad one, and one in flight."""
    j = Journal(directory, "dead")
    j.open()
    for rid in ("req_good1", "req_bad", "req_good2"):
        r = record(rid)
        if rid == "req_bad":
            model = bad.get("model")
            if isinstance(model, str):
                r.model = model
        j.begin(r)
        f = finished(r, {"claude_output_tokens": 7})
        if rid == "req_bad" and "status_code" in bad:
            f.status_code = bad["status_code"]  # type: ignore[assignment]
        j.finish(f)
    j.begin(record("req_open", reservation={"claude_output_tokens": 10}))
    crash(j)


@pytest.mark.parametrize("kind", list(_BAD))
async def test_a_record_the_store_refuses_is_quarantined_and_the_rest_is_stored_once(
    tmp_path: Path, store: Store, db: Database, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    if kind == "NUL in a text column" and not db.is_postgres:
        pytest.skip("SQLite stores a NUL")
    _dead_with_a_bad_record(tmp_path, _BAD[kind])
    bad_lines = _journal_lines(tmp_path, "req_bad")
    assert len(bad_lines) == 2
    segment = _segments(tmp_path)[0]
    metrics = Metrics()

    with caplog.at_level(logging.ERROR, "gateway.recording"):
        assert await recover(store, tmp_path, "me", metrics) == 1  # req_open, by estimate

    assert await stored_usage(store, "req_good1") == {"claude_output_tokens": 7}
    assert await stored_usage(store, "req_good2") == {"claude_output_tokens": 7}
    assert await stored_usage(store, "req_open") == {"claude_output_tokens": 10}
    assert await store.finished_ids(["req_bad"]) == set()
    assert _segments(tmp_path) == []  # the segment is gone
    rejected = tmp_path / "rejected" / f"{segment}.rejected"
    assert rejected.read_bytes().splitlines() == bad_lines  # verbatim, nothing else
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "req_bad" in errors[0].getMessage()
    assert "claude_output_tokens" not in errors[0].getMessage()  # the reason, not the line
    assert metrics.records_rejected._value.get() == 1
    # A second start has nothing left to do, and bills nothing twice.
    assert await recover(store, tmp_path, "me") == 0
    assert await store.consumed("u", *_DECEMBER) == {"claude_output_tokens": 24}
    assert rejected.read_bytes().splitlines() == bad_lines


async def test_a_store_that_is_down_is_retried_not_quarantined(tmp_path: Path, store: Store) -> None:
    _dead_with_a_bad_record(tmp_path, {"status_code": 2**63})
    await store.close()
    with pytest.raises(Exception):  # noqa: B017 (whatever the closed store raises, it is no rejection)
        await recover_journal(store, tmp_path)
    assert not (tmp_path / "rejected").exists()
    assert len(_segments(tmp_path)) == 1  # kept for the next recovery
    await store.open()


async def test_a_locked_sqlite_database_is_retried_not_quarantined(tmp_path: Path, store: Store, db: Database) -> None:
    other = sqlite3.connect(db.path, isolation_level=None)  # (skips on PostgreSQL)
    _dead_with_a_bad_record(tmp_path, {"status_code": 2**63})
    writer = store._writer  # type: ignore[attr-defined]
    writer.execute("PRAGMA busy_timeout=0")  # fail at once rather than wait 10 s for the lock
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await recover_journal(store, tmp_path)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert not (tmp_path / "rejected").exists()
    assert len(_segments(tmp_path)) == 1
    await recover_journal(store, tmp_path)  # the lock gone: stored, the bad one quarantined
    assert await stored_usage(store, "req_good1") == {"claude_output_tokens": 7}
    assert len(list((tmp_path / "rejected").iterdir())) == 1


async def test_the_recorder_does_not_take_a_refused_record_for_an_outage(tmp_path: Path, store: Store) -> None:
    # One bad record alone in its batch: every record of the batch failed, which looked like a store
    # down, and the recorder retried it for ever with backoff (here 5 s, then 10 s...). It is left to
    # the journal at once, and the next recovery quarantines it.
    j = Journal(tmp_path, "live")
    j.open()
    recorder = Recorder(store, j, retry_seconds=5.0)
    bad = record("req_bad")
    segments: list[Segment | None] = [j.begin(bad)]
    f = finished(bad, {"claude_output_tokens": 7})
    f.status_code = 2**63
    segments.append(j.finish(f))
    recorder.add(f, segments)
    await poll_until(lambda: recorder._task is not None and recorder._task.done() and recorder.backlog == 0)
    good: RequestRecord = record("req_good")
    b = j.begin(good)
    recorder.add(finished(good, {"claude_output_tokens": 2}), [b, j.finish(good)])
    await poll_until(lambda: recorder._task is not None and recorder._task.done() and recorder.backlog == 0)
    assert await stored_usage(store, "req_good") == {"claude_output_tokens": 2}
    await recorder.close()
    j.close()
    assert len(_segments(tmp_path)) == 1  # the journal keeps it
    await recover_journal(store, tmp_path)
    assert _segments(tmp_path) == []
    assert len((tmp_path / "rejected" / "live.000001.journal.rejected").read_bytes().splitlines()) == 2


async def test_a_corrected_rejected_file_moved_back_is_recovered(tmp_path: Path, store: Store) -> None:
    _dead_with_a_bad_record(tmp_path, {"status_code": 2**63})
    await recover_journal(store, tmp_path)
    (rejected,) = _rejected(tmp_path)
    corrected = rejected.read_bytes().replace(str(2**63).encode(), b"200")
    (tmp_path / rejected.name.removesuffix(".rejected")).write_bytes(corrected)  # what an operator does
    rejected.unlink()
    await recover_journal(store, tmp_path)
    assert await stored_usage(store, "req_bad") == {"claude_output_tokens": 7}
    assert _segments(tmp_path) == [] and _rejected(tmp_path) == []


def _rejected(directory: Path) -> list[Path]:
    return sorted((directory / "rejected").iterdir())
