"""The watchdog ends a worker whose event loop is stuck, naming where it is stuck."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from gateway.app import app_from_env, create_app
from gateway.settings import ConfigError, settings_from_env
from gateway.watchdog import LoopWatchdog


def watchdog_threads() -> int:
    return sum(t.name == "gateway-watchdog" for t in threading.enumerate())


def stuck_in_a_blocking_call(reported: threading.Event) -> None:
    reported.wait(timeout=10)  # blocks the loop until the watchdog has spoken (or the deadline)


async def test_a_stuck_loop_is_reported_with_where_it_is_stuck() -> None:
    reports: list[str] = []
    reported = threading.Event()

    def on_stall(report: str) -> None:
        reports.append(report)
        reported.set()

    dog = LoopWatchdog(0.2, on_stall=on_stall)
    dog.start()
    started = time.monotonic()
    try:
        stuck_in_a_blocking_call(reported)
    finally:
        dog.stop()
    assert reported.is_set()
    assert time.monotonic() - started >= 0.2
    assert len(reports) == 1
    assert reports[0].startswith("the event loop has not turned for ")
    assert "in stuck_in_a_blocking_call" in reports[0]  # the loop thread's stack, innermost last
    assert watchdog_threads() == 0


async def test_a_turning_loop_is_never_reported() -> None:
    reports: list[str] = []
    dog = LoopWatchdog(0.5, on_stall=reports.append)
    dog.start()
    try:
        for _ in range(150):  # ~1.5 s, three limits, of a loop that keeps turning
            await asyncio.sleep(0.01)
    finally:
        dog.stop()
    assert reports == []
    assert watchdog_threads() == 0


async def test_a_loop_that_turns_again_is_not_reported() -> None:
    """As after SIGSTOP / SIGCONT or a paused container, when the watchdog looks before the loop has
    marked again: the mark is old, but the loop turns."""
    reports: list[str] = []
    dog = LoopWatchdog(0.4, on_stall=reports.append)
    dog.start()
    try:
        dog._mark -= 10
        assert await asyncio.to_thread(dog._look) is None  # the loop marked while the watchdog waited
    finally:
        dog.stop()
    assert reports == []


def test_a_worker_runs_the_watchdog_and_a_single_process_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", f"sqlite:///{tmp_path / 'gateway.db'}")
    monkeypatch.setenv("GATEWAY_JOURNAL_DIR", str(tmp_path / "journal"))
    with TestClient(app_from_env()) as client:  # the factory of `serve --workers` workers
        assert client.get("/healthz").status_code == 200
        assert watchdog_threads() == 1
    assert watchdog_threads() == 0
    with TestClient(create_app(settings_from_env())):  # `serve` without workers: nothing restarts it
        assert watchdog_threads() == 0
    monkeypatch.setenv("GATEWAY_WATCHDOG_SECONDS", "0")
    with TestClient(app_from_env()):
        assert watchdog_threads() == 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "GATEWAY_WATCHDOG_SECONDS must not be negative, got '-1'"),
        ("inf", "GATEWAY_WATCHDOG_SECONDS must be 0 (off) or seconds, got inf"),
        ("nan", "GATEWAY_WATCHDOG_SECONDS must be 0 (off) or seconds, got nan"),
    ],
)
def test_watchdog_seconds_must_be_zero_or_more(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv("GATEWAY_WATCHDOG_SECONDS", value)
    with pytest.raises(ConfigError) as raised:
        settings_from_env()
    assert str(raised.value) == message
