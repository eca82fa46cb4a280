"""A worker whose event loop stops turning ends itself, so that its supervisor replaces it.

uvicorn's supervisor pings each worker, but a thread of the worker's own answers, so a worker whose
loop is stuck (a blocking call, a loop that never yields) passes: it would keep the connections it
holds and, with a listening socket per worker (`gateway.workers`), receive its share of new ones,
unanswered, for as long as it is stuck. The loop marks the time eight times per `limit`; a thread
checks the mark, and once the loop has not marked for `limit` seconds (and still does not a moment
later) it logs where the loop is stuck and ends the process. Its replacement settles what it had
in flight from its journal, as after a `kill -9`. (A stall that holds the GIL stops this thread as
well, and the pong thread with it: uvicorn's own ping catches that one.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

log = logging.getLogger("gateway.watchdog")

EXIT_STALLED = 70  # EX_SOFTWARE; not uvicorn's STARTUP_FAILURE (3), which would stop the supervisor


def _exit(report: str) -> None:
    log.critical("%s; ending this worker so that the supervisor replaces it", report)
    logging.shutdown()
    os._exit(EXIT_STALLED)


class LoopWatchdog:
    def __init__(self, limit: float, on_stall: Callable[[str], None] = _exit) -> None:
        self.limit = limit
        self._on_stall = on_stall
        self._mark = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop_thread = 0

    def start(self) -> None:
        """Watch the running loop (call from it)."""
        self._loop_thread = threading.get_ident()
        self._tick()
        self._thread = threading.Thread(target=self._watch, name="gateway-watchdog", daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        self._mark = time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(self.limit / 8, self._tick)

    def _watch(self) -> None:
        while not self._stop.wait(self.limit / 4):
            report = self._look()
            if report is not None:
                self._on_stall(report)
                return

    def _look(self) -> str | None:
        """What to report when the loop is stuck; None while it turns."""
        if time.monotonic() - self._mark <= self.limit:
            return None
        # A process resumed after being stopped (SIGSTOP, a paused container) finds the mark as old:
        # the loop, turning again, marks within a tick; a stuck one does not.
        if self._stop.wait(self.limit / 4):
            return None
        stalled = time.monotonic() - self._mark
        if stalled <= self.limit:
            return None
        frame = sys._current_frames().get(self._loop_thread)
        where = "".join(traceback.format_stack(frame)) if frame is not None else "(unknown)\n"
        return f"the event loop has not turned for {stalled:.1f} s; it is at:\n{where.rstrip()}"

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
