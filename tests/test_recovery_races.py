"""Recovery beside live processes: a segment locked, deleted or created by another process while it
reads must neither turn an exact finish into an estimate nor fail anyone."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

import gateway.journal as journal_mod
from gateway.journal import Journal, Orphans, orphans
from gateway.recording import recover_journal
from gateway.store import Store
from tests.test_journal import crash, finished, stored_usage
from tests.test_store import record

pytestmark = pytest.mark.both_backends


async def test_a_segment_locked_for_a_moment_does_not_turn_an_exact_finish_into_an_estimate(
    tmp_path: Path, store: Store
) -> None:
    # A dead process's request: its begin and its finish in two segments.
    j = Journal(tmp_path, "dead", segment_bytes=1)
    j.open()
    r = record("req_x", reservation={"claude_input_tokens": 500, "claude_output_tokens": 1000})
    b = j.begin(r)
    f = j.finish(finished(r, {"claude_input_tokens": 3, "claude_output_tokens": 4}))
    assert b is not None and f is not None and b.path != f.path
    crash(j)
    # Another process looks at the begin's segment just then (the keeper's `held()` probe, or a
    # second recovery: a worker starting, `gateway usage`), so this recovery skips that file only.
    fd = os.open(b.path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        await recover_journal(store, tmp_path)
    finally:
        os.close(fd)
    await recover_journal(store, tmp_path)  # the next recovery gets the rest

    assert await stored_usage(store, "req_x") == {"claude_input_tokens": 3, "claude_output_tokens": 4}


def _dead_with_one_finished(directory: Path) -> None:
    """What a killed process left: one request finished (5 output tokens), not stored."""
    dead = Journal(directory, "dead")
    dead.open()
    r = record("req_dead")
    dead.begin(r)
    dead.finish(finished(r, {"claude_output_tokens": 5}))
    crash(dead)


async def test_a_segment_a_live_process_deletes_during_recovery_does_not_fail_it(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dead_with_one_finished(tmp_path)
    live = Journal(tmp_path, "live", segment_bytes=1)
    live.open()
    gone = live.begin(record("req_live"))
    live.begin(record("req_live2"))  # rolls: `gone` is sealed, goes once its request is stored
    assert gone is not None and gone.sealed
    real_open = os.open

    def open_after_the_live_process_stored_its_request(path: object, *args: object, **kw: object) -> int:
        if Path(str(path)) == gone.path and gone in live._segments:
            live.stored([gone])  # between the directory listing and this open, the segment goes
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", open_after_the_live_process_stored_its_request)
    try:
        await recover_journal(store, tmp_path)
    finally:
        monkeypatch.undo()
        live.close()
    assert await stored_usage(store, "req_dead") == {"claude_output_tokens": 5}


async def test_a_recovery_the_store_fails_leaves_the_files_for_the_next_one(tmp_path: Path, store: Store) -> None:
    # The keeper recovers a dead process's journal inside a live process; the store fails once
    # (down, locked): the next round must be able to recover it (nothing may stay locked by us).
    _dead_with_one_finished(tmp_path)

    class Down:
        async def finished_ids(self, ids: object) -> set[str]:
            return set()

        async def finish_requests(self, records: object) -> None:
            raise ConnectionError("store down")

    with pytest.raises(ConnectionError):
        await recover_journal(Down(), tmp_path)  # type: ignore[arg-type]
    await recover_journal(store, tmp_path)  # the next keeper round, the store back
    assert await stored_usage(store, "req_dead") == {"claude_output_tokens": 5}


def test_a_recovery_looking_at_a_segment_being_created_does_not_fail_the_live_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = Journal(tmp_path, "live", segment_bytes=1)
    live.open()
    real_flock = fcntl.flock
    recoveries: list[Orphans | None] = []

    def flock_after_a_recovery_listed_the_new_file(fd: int, op: int) -> None:
        if op == fcntl.LOCK_EX | fcntl.LOCK_NB and not recoveries:
            # Another process's recovery (a worker starting, `gateway usage`) lists the directory
            # between this O_CREAT and this flock, and would lock the new, empty file first.
            recoveries.append(None)  # (its own flock calls come through here too)
            recoveries[0] = orphans(tmp_path)
        real_flock(fd, op)

    monkeypatch.setattr(journal_mod.fcntl, "flock", flock_after_a_recovery_listed_the_new_file)
    try:
        assert live.begin(record("req_live")) is not None  # rolls to a new segment: not refused
    finally:
        monkeypatch.undo()
        for found in recoveries:
            if found is not None:
                found.discard()
        live.close()
    assert recoveries and recoveries[0] is not None and recoveries[0].files == []
