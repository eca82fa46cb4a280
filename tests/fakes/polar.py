"""FakePolar: a loopback Polar API speaking the wire format polar-sdk 1.0.2 expects.

Shapes follow Polar's API as polar-sdk 1.0.2 reads it: exact paths (trailing slashes included), every key the
SDK's strict loader requires, 404 bodies with "error", 422 with detail[].loc, 429 with an
int Retry-After. Ingest dedups on external_id (first write wins) and validates the whole
batch like Polar (future/naive timestamps, empty metadata strings). Failure injection:
`fail_next`, `down`, `reject_when`. Runs aiohttp in a background thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from tests.fakes.polar_wire import (
    customer_json,
    meter_json,
    meter_spec,
    new_standard_secret,
    now,
    session_json,
    sign_webhook,
    state_meter_json,
    subscription_json,
    subscription_meter_json,
    validate_event,
    webhook_payload,
)

__all__ = ["FakePolar", "Recorded", "new_standard_secret", "sign_webhook", "webhook_payload"]

API_VERSIONS = frozenset({"2026-04", "2026-10", "2027-01"})


@dataclass(frozen=True, slots=True)
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass(slots=True)
class _Failure:
    status: int | str
    retry_after: int
    hold: float
    commit: bool
    path: str | None


@dataclass(slots=True)
class _State:
    meters: dict[str, tuple[int, float]]
    subscription_meters: dict[str, tuple[int, float]]
    period_start: datetime
    period_end: datetime
    subscription: bool
    status: str


class FakePolar:
    def __init__(self, token: str = "polar_oat_TEST", organization_id: str | None = None) -> None:
        self.token = token
        self.organization_id = organization_id or str(uuid.uuid4())
        self.url = ""
        self.port = 0
        self.requests: list[Recorded] = []
        self.events: dict[str, dict[str, Any]] = {}  # external_id -> first stored event
        self.anonymous_events: list[dict[str, Any]] = []  # ingested without external_id
        self.sent: Counter[str] = Counter()  # external_id -> times it appeared in any ingest body
        self.customers: dict[str, dict[str, Any]] = {}  # external_id -> Customer JSON
        self.meters: dict[str, dict[str, Any]] = {}  # id -> Meter JSON
        self.sessions: list[dict[str, Any]] = []
        self._states: dict[str, _State] = {}
        self._failures: list[_Failure] = []
        self._down: str | None = None  # None | "503" | "refused"
        self._reject: Callable[[dict[str, Any]], bool | str] | None = None
        self._reject_with_index = True
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._release: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakePolar:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._startup())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-polar", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("FakePolar did not start")
        return self

    async def _startup(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/events/ingest", self._ingest)
        app.router.add_post("/v1/customers/", self._create_customer)
        app.router.add_get("/v1/customers/external/{external_id}", self._get_customer)
        app.router.add_get("/v1/customers/external/{external_id}/state", self._get_state)
        app.router.add_post("/v1/customer-sessions/", self._create_session)
        app.router.add_get("/v1/meters/", self._list_meters)
        app.router.add_post("/v1/meters/", self._create_meter)
        app.router.add_get("/v1/meters/{id}", self._get_meter)
        self._release = asyncio.Event()
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        self.port = int(self._runner.addresses[0][1])
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop

        async def shutdown() -> None:
            if self._release is not None:
                self._release.set()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()
        self._loop = None

    def __enter__(self) -> FakePolar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # ------------------------------------------------------------------ failure injection
    def fail_next(
        self,
        n: int = 1,
        status: int | str = 500,
        *,
        retry_after: int = 1,
        hold: float = 5.0,
        commit: bool = False,
        path: str | None = None,
    ) -> None:
        """Fail the next n requests (optionally only for `path`): 5xx, 429 (+Retry-After) or "timeout".

        "timeout" holds the response for `hold` seconds (beyond the client's timeout); with
        `commit=True` the request is processed first, like a server that committed and then hung.
        """
        with self._lock:
            self._failures.extend(_Failure(status, retry_after, hold, commit, path) for _ in range(n))

    def down(self, is_down: bool, *, refuse: bool = False) -> None:
        """All requests 503 (or, with `refuse`, the port stops listening and live connections drop)."""
        with self._lock:
            was = self._down
            self._down = ("refused" if refuse else "503") if is_down else None
        if was != "refused" and self._down == "refused":
            self._run(self._stop_listening())
        elif was == "refused" and self._down != "refused":
            self._run(self._listen_again())

    async def _stop_listening(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def _listen_again(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    def reject_when(self, predicate: Callable[[dict[str, Any]], bool | str] | None, *, with_index: bool = True) -> None:
        """Events for which predicate is truthy make the whole batch 422 (str result = message).

        `with_index=False` reports loc ["body", "events"] without the index (forces a bisect)."""
        with self._lock:
            self._reject = predicate
            self._reject_with_index = with_index

    # ------------------------------------------------------------------ inspection
    def ingest_bodies(self) -> list[list[dict[str, Any]]]:
        with self._lock:
            return [r.body["events"] for r in self.requests if r.path == "/v1/events/ingest" and r.body]

    def total(self, meter: str | None = None, user_id: str | None = None) -> int:
        """Deduplicated SUM(metadata.value) over stored events, like a Polar SUM meter."""
        with self._lock:
            return sum(
                int(e.get("metadata", {}).get("value", 0))
                for e in self.events.values()
                if (meter is None or e["name"] == meter) and (user_id is None or e["external_customer_id"] == user_id)
            )

    def paths(self) -> list[str]:
        with self._lock:
            return [f"{r.method} {r.path}" for r in self.requests]

    def session_calls(self) -> int:
        """Customer sessions asked for (created or refused)."""
        return self.paths().count("POST /v1/customer-sessions/")

    # ------------------------------------------------------------------ fixtures for tests
    def add_customer(self, external_id: str, email: str | None = None) -> dict[str, Any]:
        with self._lock:
            if external_id not in self.customers:
                email = email or f"{external_id}@example.com"
                self.customers[external_id] = customer_json(external_id, email, self.organization_id)
            return self.customers[external_id]

    def add_meter(self, name: str) -> str:
        with self._lock:
            for m in self.meters.values():
                if m["name"] == name:
                    return str(m["id"])
            return str(self._store_meter(meter_spec(name))["id"])

    def meter_id(self, name: str) -> str:
        with self._lock:
            return next(str(m["id"]) for m in self.meters.values() if m["name"] == name)

    def set_state(
        self,
        user_id: str,
        meters: Mapping[str, tuple[int, float]] | None = None,
        period_start: datetime | None = None,
        period_end: datetime | None = None,
        *,
        subscription: bool = True,
        subscription_meters: Mapping[str, tuple[int, float]] | None = None,
        status: str = "active",
    ) -> None:
        """Customer state: meters={name: (credited, consumed)} as active_meters, one subscription."""
        start = period_start or now().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = period_end or start + timedelta(days=30)
        with self._lock:
            self.add_customer(user_id)
            for name in (*(meters or {}), *(subscription_meters or {})):
                self.add_meter(name)
            self._states[user_id] = _State(
                dict(meters or {}), dict(subscription_meters or {}), start, end, subscription, status
            )

    def state_payload(self, user_id: str) -> dict[str, Any]:
        """The CustomerState JSON for a user (also the `data` of customer.state_changed)."""
        with self._lock:
            customer = self.add_customer(user_id)
            st = self._states.get(user_id) or _State({}, {}, now(), now() + timedelta(days=30), False, "active")
            created = customer["created_at"]
            active_meters = [
                state_meter_json(f"cm/{user_id}/{name}", self.add_meter(name), credited, consumed, created)
                for name, (credited, consumed) in st.meters.items()
            ]
            subs = []
            if st.subscription:
                sub_meters = [
                    subscription_meter_json(f"sm/{user_id}/{name}", self.add_meter(name), credited, consumed, created)
                    for name, (credited, consumed) in st.subscription_meters.items()
                ]
                subs.append(
                    subscription_json(
                        f"sub/{user_id}",
                        status=st.status,
                        period_start=st.period_start,
                        period_end=st.period_end,
                        meters=sub_meters,
                        created=created,
                    )
                )
            return {**customer, "active_subscriptions": subs, "granted_benefits": [], "active_meters": active_meters}

    # ------------------------------------------------------------------ JSON builders
    def _store_meter(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        meter = meter_json(spec, self.organization_id)
        self.meters[str(meter["id"])] = meter
        return meter

    # ------------------------------------------------------------------ HTTP plumbing
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        query: dict[str, list[str]] = {}
        for k, v in request.query.items():
            query.setdefault(k, []).append(v)
        with self._lock:
            self.requests.append(Recorded(request.method, request.path, query, dict(request.headers), body))
            if request.path == "/v1/events/ingest" and isinstance(body, dict):
                for ev in body.get("events") or []:
                    if isinstance(ev, dict) and ev.get("external_id"):
                        self.sent[ev["external_id"]] += 1
            down = self._down
            failure = next((f for f in self._failures if f.path in (None, request.path)), None)
            if failure is not None:
                self._failures.remove(failure)
        if down == "refused":
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError("fake polar is down")
        if down == "503":
            return web.json_response({"detail": "Service Unavailable"}, status=503)
        if failure is not None:
            if failure.status == "timeout":
                response = await self._dispatch(request, handler) if failure.commit else None
                assert self._release is not None
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._release.wait(), failure.hold)
                return response or web.json_response({"detail": "late"}, status=504)
            if failure.status == 429:
                return web.json_response(
                    {"error": "TooManyRequests", "detail": "Rate limit exceeded"},
                    status=429,
                    headers={"Retry-After": str(failure.retry_after)},
                )
            assert isinstance(failure.status, int)
            return web.json_response({"detail": "Injected failure"}, status=failure.status)
        return await self._dispatch(request, handler)

    async def _dispatch(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "Unauthorized", "detail": "Invalid token"}, status=401)
        version = request.headers.get("Polar-Version")
        if version is not None and version not in API_VERSIONS:
            return web.json_response({"detail": "Not Found"}, status=404)
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPNotFound:
            return web.json_response({"detail": "Not Found"}, status=404)
        except web.HTTPMethodNotAllowed:
            return web.json_response({"detail": "Method Not Allowed"}, status=405)
        return response

    @staticmethod
    def _not_found() -> web.Response:
        return web.json_response({"error": "ResourceNotFound", "detail": "Not found"}, status=404)

    @staticmethod
    def _invalid(errors: list[dict[str, Any]]) -> web.Response:
        return web.json_response({"detail": errors}, status=422)

    # ------------------------------------------------------------------ handlers
    async def _ingest(self, request: web.Request) -> web.Response:
        body = await request.json()
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list):
            return self._invalid([{"loc": ["body", "events"], "msg": "Field required", "type": "missing"}])
        errors: list[dict[str, Any]] = []
        with self._lock:
            reject, with_index = self._reject, self._reject_with_index
        for i, ev in enumerate(events):
            errors.extend(validate_event(i, ev))
            verdict = reject(ev) if reject is not None and isinstance(ev, dict) else False
            if verdict:
                msg = verdict if isinstance(verdict, str) else "Rejected by test predicate"
                loc: list[str | int] = ["body", "events", i, "metadata"] if with_index else ["body", "events"]
                errors.append({"loc": loc, "msg": msg, "type": "value_error", "input": None})
        if errors:
            return self._invalid(errors)
        inserted = duplicates = 0
        with self._lock:
            for ev in events:
                xid = ev.get("external_id")
                if xid is None:
                    self.anonymous_events.append(ev)
                    inserted += 1
                elif xid in self.events:
                    duplicates += 1
                else:
                    self.events[xid] = ev
                    inserted += 1
        return web.json_response({"inserted": inserted, "duplicates": duplicates})

    async def _create_customer(self, request: web.Request) -> web.Response:
        body = await request.json()
        email, external_id = body.get("email"), body.get("external_id")
        if not email:
            return self._invalid([{"loc": ["body", "email"], "msg": "Field required", "type": "missing"}])
        with self._lock:
            if external_id is not None and external_id in self.customers:
                msg = "A customer with this external ID already exists."
                return self._invalid([{"loc": ["body", "external_id"], "msg": msg, "type": "value_error"}])
            if any(c["email"] == email for c in self.customers.values()):
                msg = "A customer with this email address already exists."
                return self._invalid([{"loc": ["body", "email"], "msg": msg, "type": "value_error"}])
            customer = customer_json(external_id, email, self.organization_id, body.get("name"))
            customer["metadata"] = dict(body.get("metadata") or {})
            self.customers[external_id] = customer
        return web.json_response(customer, status=201)

    async def _get_customer(self, request: web.Request) -> web.Response:
        with self._lock:
            customer = self.customers.get(request.match_info["external_id"])
        return web.json_response(customer) if customer else self._not_found()

    async def _get_state(self, request: web.Request) -> web.Response:
        user_id = request.match_info["external_id"]
        with self._lock:
            if user_id not in self.customers:
                return self._not_found()
            return web.json_response(self.state_payload(user_id))

    async def _create_session(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            if "external_customer_id" in body:
                customer = self.customers.get(body["external_customer_id"])
                loc = ["body", "external_customer_id"]
            else:
                customer = next((c for c in self.customers.values() if c["id"] == body.get("customer_id")), None)
                loc = ["body", "customer_id"]
            if customer is None:
                return self._invalid([{"loc": loc, "msg": "Customer does not exist.", "type": "value_error"}])
            session = session_json(customer, body.get("return_url"))
            self.sessions.append(session)
        return web.json_response(session, status=201)

    async def _list_meters(self, request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        limit = min(int(request.query.get("limit", "10")), 100)
        query = request.query.get("query")
        archived = request.query.get("is_archived")
        with self._lock:
            items = sorted(self.meters.values(), key=lambda m: str(m["name"]))
        if query:
            items = [m for m in items if query.lower() in str(m["name"]).lower()]
        if archived is not None:
            want = archived.lower() == "true"
            items = [m for m in items if (m["archived_at"] is not None) == want]
        total = len(items)
        max_page = max(1, -(-total // limit))
        chunk = items[(page - 1) * limit : page * limit]
        return web.json_response({"items": chunk, "pagination": {"total_count": total, "max_page": max_page}})

    async def _create_meter(self, request: web.Request) -> web.Response:
        body = await request.json()
        missing = [k for k in ("name", "filter", "aggregation") if k not in body]
        if missing:
            return self._invalid([{"loc": ["body", k], "msg": "Field required", "type": "missing"} for k in missing])
        with self._lock:
            meter = self._store_meter(body)
        return web.json_response(meter, status=201)

    async def _get_meter(self, request: web.Request) -> web.Response:
        with self._lock:
            meter = self.meters.get(request.match_info["id"])
        return web.json_response(meter) if meter else self._not_found()
