"""Stopping the gateway: every resource is released, whatever one step of the shutdown meets."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import anthropic
import pytest

from tests.conftest import Gateway
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
