"""Stopping the gateway: every resource is released, whatever one step of the shutdown meets."""

from __future__ import annotations

import logging
import signal
import sqlite3
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import Gateway, GatewayProcess, process_env
from tests.fakes.upstream import FakeUpstream, Reply

MSG = [{"role": "user", "content": "Hello"}]


def test_a_shutdown_step_that_fails_does_not_skip_the_ones_after_it(  # type: ignore[no-untyped-def]
    make_gateway, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    # Several processes on one database: at shutdown the keeper hands its idle lease back. The
    # database refuses that write (locked past its busy timeout, gone): the store must still be
    # closed (an open SQLite store's thread keeps the process from exiting), the metrics too.
    gw: Gateway = make_gateway(plan={"claude_output_tokens": 1000}, shared=True)
    key = gw.issue_key("u")
    upstream.enqueue(Reply.fixture("anthropic/message.json"))
    client = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
    client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MSG)  # type: ignore[arg-type]
    gw.wait_recorded("u")
    s = gw.services
    assert s.keeper is not None
    calls: list[str] = []

    async def locked(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    def track(name: str, close: Any) -> Any:
        async def closing(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return await close(*args, **kwargs)

        return closing

    s.keeper.store = type("Refusing", (), {"__getattr__": lambda _, name: locked})()
    s.store.close = track("store", s.store.close)
    with caplog.at_level(logging.ERROR):
        gw.server.stop()
    assert not gw.server.thread.is_alive()
    assert calls == ["store"]
    assert "database is locked" in caplog.text


@pytest.mark.parametrize("shared", ["0", "1"])
def test_sigterm_lets_a_stream_in_flight_finish_and_records_it_exactly(
    tmp_path: Path, upstream: FakeUpstream, shared: str
) -> None:
    journal = tmp_path / "term.db.journal"
    env = process_env(tmp_path / "term.db", upstream, GATEWAY_JOURNAL_DIR=str(journal), GATEWAY_SHARED=shared)
    gw = GatewayProcess(env).start()
    try:
        key = gw.issue_key("term")
        upstream.enqueue(Reply.fixture("anthropic/stream_text.sse", delay_between=0.1))
        body = {"model": "claude-sonnet-4-6", "max_tokens": 100, "messages": MSG, "stream": True}
        with httpx.stream("POST", f"{gw.url}/anthropic/v1/messages", json=body, headers={"x-api-key": key}) as r:
            chunks = r.iter_raw()
            received = next(chunks)  # in flight
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGTERM)
            received += b"".join(chunks)
        assert received.rstrip().endswith(b'data: {"type":"message_stop"}')
        assert gw.proc.wait(timeout=30) == -signal.SIGTERM  # (uvicorn ends with the signal it shut down on)
    finally:
        gw.stop()
    with sqlite3.connect(tmp_path / "term.db") as db:
        rows = db.execute("SELECT outcome, estimated, usage FROM requests WHERE user_id = 'term'").fetchall()
        held = db.execute("SELECT (SELECT COUNT(*) FROM processes) + (SELECT COUNT(*) FROM quota_leases)").fetchone()
    assert [(outcome, estimated) for outcome, estimated, _ in rows] == [("ok", 0)]
    assert held == (0,)  # shared: its leases handed back and its registration gone
    assert list(journal.iterdir()) == []  # everything stored: no segment left for a recovery
