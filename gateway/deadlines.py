"""A request waits on a shared store for a bounded time; the store's call goes on without it.

Why not `asyncio.timeout`: a database that stops answering (a network partition, a failover) leaves
asyncpg waiting for its query's cancellation to reach the server, and leaving `pool.acquire()` or a
transaction waits for that too, so a cancelled call can hang as long as the call itself. The call runs
as a task of its own instead; the request stops waiting for it at the deadline, and whatever the call
took once it ends late is handed to `late` (given back), so nothing stays held by a request that left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger("gateway.store")

T = TypeVar("T")


class StoreTimeout(Exception):
    """The store did not answer within the deadline (its call goes on in the background)."""


def log_store_failure(logger: logging.Logger, what: str, exc: Exception) -> None:
    """A store that did not answer is an outage (one line); anything else is a fault (with its traceback)."""
    if isinstance(exc, StoreTimeout):
        logger.warning("%s: %s", what, exc)
    else:
        logger.error("%s", what, exc_info=exc)


async def within(call: Coroutine[Any, Any, T], seconds: float, late: Callable[[T], None] | None = None) -> T:
    """`await call`, for at most `seconds`; then StoreTimeout, and `late(result)` when it ends after all."""
    gave_up = _GaveUp()
    task = asyncio.ensure_future(_run(call, gave_up, late))
    try:
        await asyncio.wait((task,), timeout=seconds)
    except asyncio.CancelledError:  # the request itself was cancelled: the call still ends, and gives back
        if task.done():
            _late_now(task, late)
        else:
            _give_up(task, gave_up)
        raise
    if task.done():
        return task.result()
    _give_up(task, gave_up)
    raise StoreTimeout(f"the store did not answer within {seconds:g} s")


class _GaveUp:
    __slots__ = ("yes",)

    def __init__(self) -> None:
        self.yes = False


async def _run(call: Coroutine[Any, Any, T], gave_up: _GaveUp, late: Callable[[T], None] | None) -> T:
    result = await call
    if gave_up.yes and late is not None:
        # In the same step as the call's end: a waiter it woke (a request queued on the same user's
        # lock) runs only after this, so it never finds the credit still held.
        late(result)
    return result


def _give_up(task: asyncio.Task[T], gave_up: _GaveUp) -> None:
    gave_up.yes = True
    task.add_done_callback(_log_failure)


def _late_now(task: asyncio.Task[T], late: Callable[[T], None] | None) -> None:
    if not task.cancelled() and task.exception() is None and late is not None:
        late(task.result())


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("a store call given up on failed later: %s", type(exc).__name__)
