"""The app factory: `create_app(settings)` builds every dependency and wires the routes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route, Router

from gateway.admin import Endpoint, admin_routes, guarded
from gateway.billing.endpoints import portal_endpoint, status_endpoint
from gateway.billing.keeper import LeaseKeeper, shared_quota
from gateway.billing.ledger import InProcessLedger
from gateway.billing.owner import BillingOwner
from gateway.billing.protocols import QuotaLedger
from gateway.dashboard import SessionSigner, dashboard_routes
from gateway.deadlines import within
from gateway.health import healthz_route
from gateway.healthbar import demo_route, script_route
from gateway.http_api import api_error, not_found, server_error
from gateway.journal import Journal
from gateway.keys import KeyCache
from gateway.metrics import NO_METRICS, Metrics, metrics_endpoint, multiprocess_dir
from gateway.openapi import openapi_route
from gateway.polar.client import PolarBilling
from gateway.polar.limits import LimitsRefresher
from gateway.polar.sync import Syncer
from gateway.polar.webhooks import make_webhook_endpoint, prune_forever
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.gemini import GeminiProvider
from gateway.proxy import ProxyEndpoint
from gateway.quota import Ledger
from gateway.ratelimit.shared import make_limiter, make_portal_limiter
from gateway.recording import Recorder, recover, recover_journal
from gateway.refusals import RefusalCounter
from gateway.services import Services, process_owner_id
from gateway.settings import Settings, settings_from_env
from gateway.status_tokens import StatusTokens, signing_key, status_token_route
from gateway.store import create_store
from gateway.store.base import SyncBacklog
from gateway.store.leases_base import Invalidation, InvalidationKind
from gateway.upstream import create_client
from gateway.watchdog import LoopWatchdog

log = logging.getLogger("gateway")


def build_services(settings: Settings, *, shared: bool = False) -> Services:
    """`shared`: other processes serve from the same database (workers, replicas); implied by
    PostgreSQL and GATEWAY_SHARED. Then quota goes through leases, rate limits through Redis or the
    database, and key revocations and limit changes reach every process through the store."""
    store = create_store(settings)
    shared = shared or settings.is_shared
    polar = PolarBilling.from_settings(settings) if settings.polar_enabled else None
    owner = process_owner_id()
    journal = Journal(settings.journal_path, owner)
    keys = KeyCache(store)
    ledger: QuotaLedger
    keeper: LeaseKeeper | None = None
    if shared:

        def invalidated(inv: Invalidation) -> None:
            if inv.kind == InvalidationKind.KEY:
                keys.evict_key_id(inv.subject)

        async def recover_dead(directory: Path) -> object:
            return await recover_journal(store, directory, metrics)  # (`metrics` is made below)

        leased, keeper = shared_quota(
            settings,
            store,
            store,
            owner,
            journal_dir=journal.directory,
            recover=recover_dead,
            on_invalidation=invalidated,
            on_dead=store.release_owner_claims,  # its sync claims now rather than after their lease
        )
        ledger = leased
    else:
        ledger = InProcessLedger(Ledger(store, settings.file.plan))
    limiter = make_limiter(settings, store, shared=shared)
    metrics = NO_METRICS if settings.metrics == "off" else Metrics()
    recorder = Recorder(store, journal, on_stored=ledger.stored, linger=settings.record_linger_seconds, metrics=metrics)
    refusals = RefusalCounter(store, interval=settings.refusals_flush_seconds, metrics=metrics)
    return Services(
        polar=polar,
        settings=settings,
        store=store,
        keys=keys,
        ledger=ledger,
        limiter=limiter,
        owner=owner,
        journal=journal,
        recorder=recorder,
        billing=BillingOwner(
            ledger, limiter, journal, recorder, metrics, refusals, store_timeout=settings.store_timeout_seconds
        ),
        refusals=refusals,
        portal_limiter=make_portal_limiter(settings, store, shared=shared),
        metrics=metrics,
        keeper=keeper,
    )


async def _close_each(*steps: tuple[str, Callable[[], object] | None]) -> None:
    """Run every closer in turn (None: nothing to close); one that fails is logged, not the end."""
    for name, close in steps:
        if close is None:
            continue
        try:
            done = close()
            if inspect.isawaitable(done):
                await done
        except Exception:
            log.exception("shutdown: closing the %s failed", name)


def _meter_names(s: Services) -> Callable[[Collection[str]], Awaitable[Mapping[str, str]]]:
    async def names(ids: Collection[str]) -> Mapping[str, str]:
        return await s.polar.meter_names(ids) if s.polar is not None else {}

    return names


class _JsonCORSMiddleware(CORSMiddleware):
    """A refused preflight answers in the own API's JSON error shape, not Starlette's plain text."""

    def preflight_response(self, request_headers: Any) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return api_error(400, bytes(response.body).decode(), headers)


def _browser_routes(settings: Settings, prefix: str, routes: list[BaseRoute]) -> Mount:
    """Routes a browser on another origin may call (the billing routes, the widget): CORS for
    GATEWAY_CORS_ORIGINS only, and only under `prefix`, so the provider hot path never sees it."""
    origins = settings.cors_origin_list
    cors = [
        Middleware(
            _JsonCORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "HEAD"],
            allow_headers=["authorization"],
            max_age=600,
        )
    ]
    # 404/405 are answered inside the CORS middleware, so a browser can read them too.
    errors = Middleware(ExceptionMiddleware, handlers={404: not_found, 405: not_found})
    return Mount(prefix, app=Router(routes, redirect_slashes=False), middleware=[*cors, errors] if origins else None)


class GatewayApp:
    """Sends provider paths straight to their raw ASGI endpoints; everything else to Starlette."""

    def __init__(self, app: Starlette, services: Services, proxies: dict[str, ProxyEndpoint]) -> None:
        self.app = app
        self.services = services
        self._proxies = proxies

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            for prefix, endpoint in self._proxies.items():
                if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                    await endpoint(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def create_app(
    settings: Settings, services: Services | None = None, *, shared: bool = False, watchdog: bool = False
) -> GatewayApp:
    """`watchdog`: end the process when its event loop is stuck for `watchdog_seconds` (a supervised worker)."""
    s = services or build_services(settings, shared=shared)
    reservation = settings.file.reservation
    anthropic = AnthropicProvider(
        settings.anthropic_upstream,
        settings.anthropic_api_key,
        reservation.default_max_output_tokens,
        reservation.document_input_tokens,
        web_searches_per_request=reservation.web_searches_per_request,
        server_tool_input_tokens=reservation.server_tool_input_tokens,
    )
    gemini = GeminiProvider(
        settings.gemini_upstream,
        settings.gemini_api_key,
        reservation.gemini_max_output_tokens,
        reservation.images_per_request,
        reservation.gemini_document_input_tokens,
        reservation.gemini_server_tool_input_tokens,
    )

    syncer: Syncer | None = None  # set in the lifespan when Polar is configured

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal syncer
        try:
            await s.store.open()
            applied = await s.store.migrate()
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            if s.keeper is None:
                await recover(s.store, s.journal.directory, s.owner, s.metrics)
            else:
                # Only what dead processes left: live ones hold their journal segments (flock). The
                # keeper hands back a dead process's sync claims once it is taken for dead.
                await recover_journal(s.store, s.journal.directory, s.metrics)
            s.journal.open()
            if s.keeper is not None:
                await s.keeper.start()  # after the journal: its lock tells the others this process is alive
        except BaseException:
            # A failed start must end the process: an open store's thread (aiosqlite's is not a
            # daemon) would keep it alive, half-started, and a supervisor would never replace it.
            await _close_each(("journal", s.journal.close), ("store", s.store.close))
            raise
        s.client = create_client(settings.connect_timeout_seconds)
        if not settings.anthropic_api_key:
            log.warning("ANTHROPIC_API_KEY is not set: Claude requests will be refused by the provider")
        if not settings.gemini_api_key:
            log.warning("GEMINI_API_KEY is not set: Gemini requests will be refused by the provider")
        stop = asyncio.Event()
        stuck = LoopWatchdog(settings.watchdog_seconds) if watchdog and settings.watchdog_seconds > 0 else None
        if stuck is not None:
            stuck.start()
        background = [asyncio.create_task(s.refusals.run_forever(stop), name="refusals-flush")]
        if s.polar is None:
            log.warning("POLAR_ACCESS_TOKEN is not set: running with config-file limits only, no sync to Polar")
        else:
            syncer = Syncer(
                s.store,
                s.polar,
                owner=s.owner,
                batch_size=settings.sync_batch_size,
                interval=settings.sync_interval_seconds,
                max_attempts=settings.sync_max_attempts,
                backoff_base=settings.sync_backoff_seconds,
                backoff_max=settings.sync_backoff_max_seconds,
                metrics=s.metrics,
            )
            s.recorder.on_events = syncer.notify
            refresher = LimitsRefresher(s.store, s.polar, settings.limits_max_age_seconds, s.limits_changed)
            background += [
                asyncio.create_task(syncer.run_forever(stop), name="polar-sync"),
                asyncio.create_task(refresher.run_forever(stop), name="polar-limits"),
            ]
            log.info("Polar %s: syncing usage every %.0f s", settings.polar_environment, settings.sync_interval_seconds)
        if settings.polar_webhook_secret:  # deliveries are claimed: forget old claims (in every process)
            retention = settings.webhook_retention_days * 86400.0
            background.append(asyncio.create_task(prune_forever(s.store, retention, stop), name="webhook-prune"))
        if multiprocess_dir():
            background.append(asyncio.create_task(s.metrics.flush_every(stop), name="metrics-flush"))
        try:
            yield
        finally:
            stop.set()
            # An interrupted ingest is harmless: its claimed events return after the lease, deduplicated.
            _, pending = await asyncio.wait(background, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            # In this order, each step whatever the ones before it met: a step skipped would leave
            # its resource open (an open SQLite store's thread keeps the process from exiting).
            await _close_each(
                ("http client", s.client.close),
                ("polar client", s.polar.close if s.polar is not None else None),
                ("recorder", s.recorder.close),
                ("rate limiter", s.limiter.close),  # its last token corrections may go to the store
                ("portal rate limiter", s.portal_limiter.close),
                ("refusal counts", s.refusals.close),  # the last counts (no more requests by now)
                ("journal", s.journal.close),
                # leases back, but for what covers requests left to the journal
                ("lease keeper", s.keeper.close if s.keeper is not None else None),
                ("store", s.store.close),
                ("metrics", s.metrics.close),
                ("watchdog", stuck.stop if stuck is not None else None),
            )

    def polar_ok() -> bool | None:
        return syncer.last_call_ok if syncer is not None else None

    tokens = StatusTokens(signing_key(settings.status_token_secret, settings.admin_token))

    def admin_only(endpoint: Endpoint) -> Endpoint:
        return guarded(s, endpoint)

    routes: list[BaseRoute] = [
        # `unstored` only grows while the database refuses writes.
        healthz_route(s.store, lambda: s.recorder.backlog, polar_ok),
        _browser_routes(
            settings,
            "/api/billing",
            [Route("/status", status_endpoint(s, tokens)), Route("/portal", portal_endpoint(s, tokens))],
        ),
        _browser_routes(settings, "/static", [script_route("/healthbar.js")]),
        Route(
            "/webhooks/polar",
            make_webhook_endpoint(
                s.store,
                settings.polar_webhook_secret,
                _meter_names(s),
                s.limits_changed,
                polar=s.polar,
                metrics=s.metrics,
                store_timeout=settings.store_timeout_seconds,
            ),
            methods=["POST"],
        ),
        *admin_routes(s),
        status_token_route(tokens, admin_only),
        demo_route(tokens, SessionSigner(settings.admin_token).session_or(admin_only)),
        openapi_route(),
        *dashboard_routes(s),
    ]
    if settings.metrics != "off":
        # A scrape must answer while the database does not: that is when the metrics matter most.
        def backlog() -> Awaitable[SyncBacklog]:
            return within(s.store.sync_backlog(), settings.store_timeout_seconds)

        scrape = metrics_endpoint(s.metrics, backlog)
        routes.append(Route("/metrics", scrape if settings.metrics == "open" else guarded(s, scrape)))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: not_found, Exception: server_error},
    )
    # `/admin/keys/` is a JSON 404 like any unknown path, not a bodiless redirect.
    app.router.redirect_slashes = False
    app.state.services = s
    return GatewayApp(
        app,
        s,
        {
            "/anthropic": ProxyEndpoint(anthropic, s, "/anthropic"),
            "/gemini": ProxyEndpoint(gemini, s, "/gemini"),
        },
    )


def app_from_env() -> GatewayApp:
    """The app of one `gateway serve --workers N` worker (uvicorn's factory, called in each spawned
    process): settings from the environment the parent set, GATEWAY_SHARED among them."""
    from gateway.collector import tune_collector
    from gateway.logs import configure_logging
    from gateway.server import ensure_fd_headroom

    settings = settings_from_env()
    configure_logging(settings.log_format)
    app = create_app(settings, watchdog=True)  # the supervisor replaces a worker that ends
    tune_collector()  # after the build, as `gateway serve` does: the app's objects are frozen too
    ensure_fd_headroom(settings.max_connections)
    return app
