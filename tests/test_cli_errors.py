"""The `gateway` command line as a user runs it (subprocesses, the fake Polar only): JSON that parses,
one-line errors for a database that is not there, `--port` as `GATEWAY_PORT`, errors on stderr."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import ROOT, run_cli
from tests.fakes.polar import FakePolar


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path}/gw.db",
        "GATEWAY_JOURNAL_DIR": str(tmp_path / "journal"),
        "POLAR_ACCESS_TOKEN": "",
        "POLAR_BASE_URL": "",
        **extra,
    }


def _one_line_error(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-1500:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr[-1500:]


def test_keys_create_json_with_email_prints_only_json(tmp_path: Path) -> None:
    """README: `keys create --user alice --json` prints {"id","key","user_id"}: stdout must parse as JSON,
    with --email too (a script reads the key from it)."""
    with FakePolar() as polar:
        env = _env(tmp_path, POLAR_ACCESS_TOKEN=polar.token, POLAR_BASE_URL=polar.url)
        done = run_cli(env, "keys", "create", "--user", "alice", "--email", "alice@example.com", "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        assert "alice" in polar.customers
    body = json.loads(done.stdout)
    assert body["user_id"] == "alice" and body["key"].startswith("pgw_")


def test_database_that_cannot_be_opened_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    done = run_cli(_env(tmp_path, GATEWAY_DATABASE_URL=f"sqlite:///{tmp_path}"), "keys", "list", timeout=60)
    _one_line_error(done)


def test_postgres_down_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run_cli(
        _env(tmp_path, GATEWAY_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/gw"), "migrate", timeout=60
    )
    _one_line_error(done)


def _serve(env: dict[str, str], *args: str, wait: float = 20) -> tuple[int | None, str]:
    """Start `gateway serve ARGS`; return (exit code or None if it was still serving, its stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and proc.poll() is None and "running on" not in "".join(lines):
        time.sleep(0.1)
    rc = proc.poll()
    if rc is None:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(5)
    return rc, "".join(lines)


def test_serve_port_0_flag_overrides_gateway_port(tmp_path: Path) -> None:
    """`--port` overrides GATEWAY_PORT (help text); GATEWAY_PORT=0 means an ephemeral port, so must `--port 0`."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        rc, err = _serve(_env(tmp_path, GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(taken)), "--port", "0")
    assert "running on http://127.0.0.1:" in err, err[-1500:]
    assert f"127.0.0.1:{taken} " not in err and rc is None, err[-1500:]


def test_serve_port_out_of_range_is_refused_like_gateway_port(tmp_path: Path) -> None:
    """GATEWAY_PORT=70000 is a configuration error (exit 2); `--port 70000` must not serve anyway."""
    rc, err = _serve(_env(tmp_path, GATEWAY_HOST="127.0.0.1"), "--port", "70000", wait=15)
    assert rc == 2 and "0-65535" in err, err[-1500:]
    assert "Traceback" not in err, err[-1500:]


def test_serve_workers_port_out_of_range_is_not_a_traceback(tmp_path: Path) -> None:
    rc, err = _serve(_env(tmp_path, GATEWAY_HOST="127.0.0.1"), "--port", "70000", "--workers", "2", wait=30)
    assert rc is not None and rc != 0, err[-1500:]
    assert "Traceback" not in err, err[-1500:]


def test_sync_without_polar_reports_the_error_on_stderr(tmp_path: Path) -> None:
    done = run_cli(_env(tmp_path), "sync", timeout=60)
    assert done.returncode == 2
    assert "POLAR_ACCESS_TOKEN" in done.stderr, (done.stdout, done.stderr)
