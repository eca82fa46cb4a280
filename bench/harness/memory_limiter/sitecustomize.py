"""`--memory-limiter` (bench/run.py, hotspots.py, instructions.py): every gateway process keeps its
rate limits in its own memory, as a single worker does, even when it shares the database.

What it is for: the shared rate limiter (a store or Redis round trip per admission) is measured
on its own; with this, `gateway-pg` and `gateway-w2` differ from `gateway` only by what else
shared mode does per request (leases, keeper, the store's batches, two processes on one file).
The limits are the bench's (never hit), so nothing is refused. Loaded through PYTHONPATH by every
Python process of the contender, spawned workers included.
"""

from __future__ import annotations

from typing import Any

import gateway.app
from gateway import ratelimit_shared

_make_limiter = ratelimit_shared.make_limiter


def _in_memory(settings: Any, store: Any, *, shared: bool) -> Any:
    return _make_limiter(settings, store, shared=False)


gateway.app.make_limiter = _in_memory  # type: ignore[assignment]
