"""A database that refuses writes during traffic (a full disk): the gateway keeps serving, usage
waits in the journal, and once the fault clears every request is stored once."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest

from tests.conftest import GatewayProcess, process_env, wait_until
from tests.fakes.upstream import FakeUpstream

MSG = [{"role": "user", "content": "Hello"}]


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (skips the test where mounting is not permitted)."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> Path:
    """Take every free byte of the filesystem holding `directory`."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = 1 << 20
        while size:  # smaller and smaller writes until not one byte fits
            try:
                os.write(fd, b"\0" * size)
            except OSError:
                size //= 2
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


def unstored(gw: GatewayProcess) -> int:
    return int(httpx.get(f"{gw.url}/healthz", timeout=5).json()["unstored"])


def test_a_full_disk_under_the_database_loses_nothing(tmp_path: Path, upstream: FakeUpstream) -> None:
    """The database on a small tmpfs, the journal elsewhere. (A read-only remount cannot be made
    while the gateway holds the database open for writing: the kernel answers EBUSY.)"""
    with small_tmpfs(tmp_path / "dbfs") as fs:
        db = fs / "gateway.db"
        env = process_env(db, upstream, GATEWAY_JOURNAL_DIR=str(tmp_path / "journal"))
        gw = GatewayProcess(env).start()
        try:
            key = gw.issue_key("erin")
            client = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
            ask = lambda: client.messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)  # type: ignore[arg-type]  # noqa: E731
            ask()
            wait_until(lambda: unstored(gw) == 0, timeout=10)
            filler = fill(fs)
            for i in range(1, 13):
                reply = ask()  # served while the store takes nothing
                assert (reply.usage.input_tokens, reply.usage.output_tokens) == (12, 9)
                wait_until(lambda n=i: unstored(gw) >= n, timeout=10)
            assert unstored(gw) == 12
            assert sum(f.stat().st_size for f in (tmp_path / "journal").rglob("*") if f.is_file()) > 0
            filler.unlink()
            wait_until(lambda: unstored(gw) == 0, timeout=60, interval=0.2)
        finally:
            gw.stop()
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "SELECT r.id, u.key, u.value FROM requests AS r, json_each(r.usage) AS u WHERE r.user_id = 'erin'"
            ).fetchall()
        assert (len(rows), len({r[0] for r in rows})) == (26, 13)  # each request stored once, two meters each
        usage: dict[str, int] = {}
        for _, meter, value in rows:
            usage[meter] = usage.get(meter, 0) + value
        assert usage == {"claude_input_tokens": 13 * 12, "claude_output_tokens": 13 * 9}
