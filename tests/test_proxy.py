"""The disconnect watch of a streamed response (the rest of the proxy is driven end to end in tests/e2e)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest

from gateway import proxy
from gateway.proxy import _DisconnectWatch


class _Response:
    def __init__(self) -> None:
        self.closed = asyncio.Event()

    def close(self) -> None:
        self.closed.set()


async def test_a_stopped_watch_is_freed_without_the_cyclic_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cycle through the watch would keep the response and the server's request cycle alive until
    # a collection: hundreds of them at a few hundred slow streams.
    monkeypatch.setattr(proxy, "WATCH_AFTER_SECONDS", 0.0)
    never = asyncio.Event()
    started = asyncio.Event()

    async def receive() -> dict[str, Any]:
        started.set()
        await never.wait()
        return {"type": "http.disconnect"}

    gc.disable()
    try:
        resp = _Response()
        watch = _DisconnectWatch(receive, resp, 60.0)  # type: ignore[arg-type]
        await asyncio.wait_for(started.wait(), 5)  # the timer fired and the task is reading receive()
        held = weakref.ref(resp)  # held by the watch alone from here
        del resp
        watch.stop()
        del watch
        for _ in range(100):  # the cancelled task finishes within a few loop iterations
            if held() is None:
                break
            await asyncio.sleep(0)
        assert held() is None
    finally:
        gc.enable()


async def test_a_client_that_leaves_is_noticed_and_the_drain_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy, "WATCH_AFTER_SECONDS", 0.0)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    resp = _Response()
    watch = _DisconnectWatch(receive, resp, 0.01)  # type: ignore[arg-type]
    await asyncio.wait_for(resp.closed.wait(), 5)
    assert watch.gone and watch.expired
    watch.stop()


async def test_a_stream_that_ends_before_the_watch_starts_never_reads_receive() -> None:
    async def receive() -> dict[str, Any]:
        raise AssertionError("receive() read for a stream shorter than WATCH_AFTER_SECONDS")

    watch = _DisconnectWatch(receive, _Response(), 60.0)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    watch.stop()
    await asyncio.sleep(proxy.WATCH_AFTER_SECONDS + 0.05)  # past the moment the timer would have fired
    assert not watch.gone
