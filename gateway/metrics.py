"""Prometheus metrics: one `Metrics` object owns every metric; the code that counts gets it passed in.

Labels are bounded by construction: providers, route operations, HTTP statuses, meter names,
refusal reasons, sync causes and known webhook types. Nothing per user, nothing secret.

The hot path only adds to plain tallies (a dict entry, a bucket found by bisection); they move into
prometheus-client's objects when scraped (and every second with several processes): its own
updates take a lock each, and at a few per request they cost more than the rest of the request's
bookkeeping together.

With `PROMETHEUS_MULTIPROC_DIR` set (`prepare_multiprocess` sets it for `gateway serve --workers N`),
prometheus-client keeps each process's values in files in that directory and a scrape, answered by
any worker, sums them all. The sync backlog is read from the store at scrape time instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from gateway.store.base import SyncBacklog

log = logging.getLogger("gateway.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"  # the label value for anything outside a known set

BacklogReader = Callable[[], Awaitable[SyncBacklog]]

# What the gateway adds before the provider sees a request: microseconds to milliseconds.
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_TTFB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess(workers: int) -> str | None:
    """Before starting `workers` > 1 processes: a directory for their metric files (a fresh temporary
    one unless PROMETHEUS_MULTIPROC_DIR names one), emptied of an earlier run's values. Returns it."""
    if workers <= 1:
        return None
    path = multiprocess_dir() or tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ[MULTIPROC_ENV] = path
    for stale in Path(path).glob("*.db"):
        stale.unlink(missing_ok=True)
    # prometheus-client picks its value class when first imported; metrics made from now on use files.
    values.ValueClass = values.get_value_class()
    return path


def worker_exited(pid: int) -> None:
    """A worker process ended: its live gauges (reservations in flight) stop counting."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)


class _Tally:
    """Histogram observations not yet in prometheus-client: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with value <= its bound
        self.total += value

    def move_to(self, histogram: Histogram) -> None:
        counts, self.counts, total, self.total = self.counts, [0] * len(self.counts), self.total, 0.0
        if not any(counts):
            return
        # (prometheus-client has no public call adding many observations at once)
        for bucket, n in zip(histogram._buckets, counts, strict=True):
            if n:
                bucket.inc(n)
        histogram._sum.inc(total)


class ProviderMetrics:
    """One provider's per-request metrics, tallied; `Metrics.flush` moves them into the exported ones."""

    __slots__ = ("_m", "_overhead", "_provider", "_requests", "_ttfb")

    def __init__(self, m: Metrics, provider: str) -> None:
        self._m = m
        self._provider = provider
        self._overhead = _Tally(_OVERHEAD_BUCKETS)
        self._ttfb = _Tally(_TTFB_BUCKETS)
        self._requests: defaultdict[tuple[str, int], int] = defaultdict(int)

    def request(self, route: str, status: int) -> None:
        self._requests[(route, status)] += 1

    def forwarded(self, overhead: float, ttfb: float) -> None:
        self._overhead.add(overhead)
        self._ttfb.add(ttfb)

    def flush(self) -> None:
        m, provider = self._m, self._provider
        requests, self._requests = self._requests, defaultdict(int)
        for (route, status), n in requests.items():
            m.requests.labels(provider, route, str(status)).inc(n)
        self._overhead.move_to(m.overhead.labels(provider))
        self._ttfb.move_to(m.ttfb.labels(provider))


class Metrics:
    """Every metric the gateway exports, in its own registry (tests run several gateways in one process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests", "Provider requests answered, by route operation and HTTP status",
            ["provider", "route", "status"], registry=r,
        )  # fmt: skip
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time from a request's arrival to forwarding it upstream (authentication, checks, billing)",
            ["provider"], buckets=_OVERHEAD_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttfb = Histogram(
            "gateway_upstream_ttfb_seconds", "Time from forwarding a request to the provider's response headers",
            ["provider"], buckets=_TTFB_BUCKETS, registry=r,
        )  # fmt: skip
        self.usage = Counter("gateway_usage", "Billed usage (tokens or counts) by meter", ["meter"], registry=r)
        self.refusals = Counter(
            "gateway_refusals", "Requests refused before forwarding, by HTTP status and reason",
            ["status", "reason"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "gateway_reservations_in_flight", "Quota reservations held by requests under way",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.sync_attempts = Counter("gateway_sync_attempts", "Usage batches sent to Polar", registry=r)
        self.sync_failures = Counter(
            "gateway_sync_failures", "Usage batches Polar did not take, by cause", ["cause"], registry=r
        )
        self.webhooks = Counter(
            "gateway_webhooks", "Polar webhook deliveries by event type and outcome", ["type", "outcome"], registry=r
        )
        self.store_errors = Counter(
            "gateway_store_errors", "Store operations that failed, by operation", ["operation"], registry=r
        )
        self.records_rejected = Counter(
            "gateway_records_rejected",
            "Journaled requests the store refused on their own, set aside in the journal's rejected/ directory",
            registry=r,
        )
        self._providers: list[ProviderMetrics] = []
        self._usage: defaultdict[str, int] = defaultdict(int)
        self._in_flight = 0

    def for_provider(self, provider: str) -> ProviderMetrics:
        tally = ProviderMetrics(self, provider)
        self._providers.append(tally)
        return tally

    def flush(self) -> None:
        """Move the hot path's tallies into the exported metrics."""
        for provider in self._providers:
            provider.flush()
        usage, self._usage = self._usage, defaultdict(int)
        for meter, n in usage.items():
            self.usage.labels(meter).inc(n)
        self.in_flight.set(self._in_flight)

    async def flush_every(self, stop: asyncio.Event, seconds: float = 1.0) -> None:
        """Several processes: each flushes on its own, since a scrape is answered by only one."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
            self.flush()

    # ------------------------------------------------------------------ billing
    def refused(self, status: int, reason: str) -> None:
        self.refusals.labels(str(status), reason).inc()

    def reservation_taken(self) -> None:
        self._in_flight += 1

    def reservation_settled(self, usage: Mapping[str, int]) -> None:
        self._in_flight -= 1
        tally = self._usage
        for meter, value in usage.items():
            tally[meter] += value

    # ------------------------------------------------------------------ background work
    def sync_attempt(self) -> None:
        self.sync_attempts.inc()

    def sync_failed(self, cause: str) -> None:
        self.sync_failures.labels(cause).inc()

    def webhook(self, event_type: str, outcome: str) -> None:
        self.webhooks.labels(event_type, outcome).inc()

    def store_error(self, operation: str, n: int = 1) -> None:
        self.store_errors.labels(operation).inc(n)

    def rejected(self, n: int) -> None:
        self.records_rejected.inc(n)

    # ------------------------------------------------------------------ exposition
    async def render(self, backlog: BacklogReader | None) -> bytes:
        """The text exposition: every process's metrics, then the sync backlog read from the store now."""
        families: list[Metric] = []
        if backlog is not None:
            try:
                got = await backlog()
                pending, failed, oldest = got.pending, got.failed, got.oldest_pending_at
            except Exception as exc:
                log.warning("metrics: could not read the sync backlog (%s)", type(exc).__name__)
                self.store_error("sync_backlog")
            else:
                families = _backlog_families(pending, failed, oldest)
        self.flush()
        if multiprocess_dir():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        text = generate_latest(registry)
        if families:
            extra = CollectorRegistry(auto_describe=False)
            extra.register(_Fixed(families))
            text += generate_latest(extra)
        return text

    def close(self) -> None:
        """This process is stopping: what it counted stays (multi-process mode), its live gauges go."""
        self.flush()
        worker_exited(os.getpid())


class NullMetrics(Metrics):
    """GATEWAY_METRICS=off, and the default where nothing is measured: every hook does nothing."""

    def __init__(self) -> None:
        pass

    def for_provider(self, provider: str) -> ProviderMetrics:
        return _NULL_PROVIDER

    def flush(self) -> None:
        pass

    async def flush_every(self, stop: asyncio.Event, seconds: float = 1.0) -> None:
        pass

    def refused(self, status: int, reason: str) -> None:
        pass

    def reservation_taken(self) -> None:
        pass

    def reservation_settled(self, usage: Mapping[str, int]) -> None:
        pass

    def sync_attempt(self) -> None:
        pass

    def sync_failed(self, cause: str) -> None:
        pass

    def webhook(self, event_type: str, outcome: str) -> None:
        pass

    def store_error(self, operation: str, n: int = 1) -> None:
        pass

    def rejected(self, n: int) -> None:
        pass

    async def render(self, backlog: BacklogReader | None) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _NullProvider(ProviderMetrics):
    __slots__ = ()

    def __init__(self) -> None:
        pass

    def request(self, route: str, status: int) -> None:
        pass

    def forwarded(self, overhead: float, ttfb: float) -> None:
        pass

    def flush(self) -> None:
        pass


_NULL_PROVIDER = _NullProvider()
NO_METRICS = NullMetrics()


def _backlog_families(pending: int, failed: int, oldest: datetime | None) -> list[Metric]:
    backlog = GaugeMetricFamily(
        "gateway_sync_backlog_requests", "Requests whose usage is not in Polar yet, by state", labels=["state"]
    )
    backlog.add_metric(["pending"], pending)
    backlog.add_metric(["failed"], failed)
    age = GaugeMetricFamily(
        "gateway_sync_oldest_pending_age_seconds", "Age of the oldest request waiting to sync (0 when none)"
    )
    age.add_metric([], max(0.0, time.time() - oldest.timestamp()) if oldest else 0.0)
    return [backlog, age]


class _Fixed:
    """A collector yielding families already built."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def metrics_endpoint(metrics: Metrics, backlog: BacklogReader | None) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return Response(await metrics.render(backlog), media_type=CONTENT_TYPE_LATEST)

    return endpoint
