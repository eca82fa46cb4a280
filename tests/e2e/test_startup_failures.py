"""A gateway that cannot start ends, with a failure code, so that whatever supervises it restarts it:
never half-started (an open store kept the process alive) nor reporting success."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GatewayProcess, process_env, run_cli
from tests.fakes.upstream import FakeUpstream

_FAIL_WORKER = """
import os
if os.environ.get("GATEWAY_SHARED") == "1" and os.path.exists(os.environ["GATEWAY_TEST_FAIL_MARKER"]):
    import gateway.billing.keeper as keeper

    async def start(self):
        raise ConnectionRefusedError("simulated: the database refused the worker at startup")

    keeper.LeaseKeeper.start = start
"""


def _failing_worker_env(tmp_path: Path, upstream: FakeUpstream) -> tuple[dict[str, str], Path]:
    """Workers (only they have GATEWAY_SHARED=1 set by the supervisor) fail their lifespan startup
    while the marker file exists, as on a database that refuses them."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_FAIL_WORKER)
    marker = tmp_path / "fail-workers"
    root = str(Path(__file__).resolve().parents[2])
    env = process_env(
        tmp_path / "gateway.db",
        upstream,
        GATEWAY_JOURNAL_DIR=str(tmp_path / "journal"),
        PYTHONPATH=f"{site}{os.pathsep}{root}",
        GATEWAY_TEST_FAIL_MARKER=str(marker),
    )
    env.pop("GATEWAY_SHARED", None)
    return env, marker


@pytest.mark.skipif(sys.platform != "linux", reason="linux")
def test_workers_that_cannot_start_end_the_supervisor_with_a_failure_code(
    tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, marker = _failing_worker_env(tmp_path, upstream)
    marker.touch()
    monkeypatch.delenv("GATEWAY_SHARED", raising=False)  # (only the workers get it, from the supervisor)
    done = run_cli({**env, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": "0"}, "serve", "--workers", "2", timeout=60)
    assert "simulated: the database refused the worker at startup" in done.stderr
    assert done.returncode != 0, done.stderr[-2000:]


def test_a_locked_database_at_startup_is_an_exit_not_a_hang(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Another process holds the SQLite write lock past the busy timeout: `gateway serve` must fail
    and end (a supervisor such as systemd restarts it), not hang half-started."""
    db = tmp_path / "gateway.db"
    env = process_env(db, upstream, GATEWAY_JOURNAL_DIR=str(tmp_path / "journal"))
    migrated = run_cli(env, "migrate", timeout=60)
    assert migrated.returncode == 0, migrated.stderr
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # (WAL: readers go on, every writer waits)
        gw = GatewayProcess(env).launch()
        assert gw.proc is not None
        try:
            rc = gw.proc.wait(timeout=45)  # the busy timeout is 10 s
        except subprocess.TimeoutExpired:
            rc = None
        stderr = ""
        if rc is None:
            gw.proc.kill()
            gw.proc.wait()
        stderr = gw.proc.stderr.read().decode() if gw.proc.stderr else ""
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "Application startup failed" in stderr, stderr[-3000:]
    assert rc is not None, "the gateway failed its startup but never exited:\n" + stderr[-1500:]
    assert rc != 0
