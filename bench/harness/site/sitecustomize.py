"""Patches for the measurement, loaded by every Python process of a gateway contender (its
PYTHONPATH holds this directory, so spawned workers get them too), each turned on by a variable:

- `BENCH_MEMORY_LIMITER=1` (`--memory-limiter`): every gateway process keeps its rate limits in its
  own memory, as a single worker does, even when it shares the database. The shared rate limiter
  (a store or Redis round trip per admission) is measured on its own; with this, `gateway-pg` and
  `gateway-w2` differ from `gateway` only by what else shared mode does per request (leases, the
  keeper, the store's batches, two processes on one file). The bench's limits are never hit.
- `BENCH_SLOW_WORKERS=1` (bench/instructions.py, `--workers N` under valgrind): uvicorn's supervisor
  takes a worker that does not answer its ping within 5 s for hung and restarts it; under callgrind
  every worker is that slow, so only a worker that exited counts as dead.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any


def _after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run `patch` on module `name` once it is imported (not before: importing the gateway here would
    slow every process's start, and uvicorn takes a worker that answers its first ping late for hung)."""
    if name in sys.modules:  # (bench/pipeline.py runs this file after importing the gateway)
        patch(sys.modules[name])
        return

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            if spec is None or spec.loader is None:
                return spec
            run = spec.loader.exec_module

            def exec_module(module: ModuleType) -> None:
                run(module)
                patch(module)

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, Finder())


def _memory_limiter(app: ModuleType) -> None:
    make_limiter = app.make_limiter

    def in_memory(settings: Any, store: Any, *, shared: bool) -> Any:
        return make_limiter(settings, store, shared=False)

    app.make_limiter = in_memory  # type: ignore[attr-defined]


def _slow_workers(multiprocess: ModuleType) -> None:
    def alive(self: Any, timeout: float = 5) -> bool:
        return bool(self.process.is_alive())

    multiprocess.Process.is_alive = alive  # type: ignore[attr-defined]


if os.environ.get("BENCH_MEMORY_LIMITER") == "1":
    _after_import("gateway.app", _memory_limiter)
if os.environ.get("BENCH_SLOW_WORKERS") == "1":
    _after_import("uvicorn.supervisors.multiprocess", _slow_workers)
