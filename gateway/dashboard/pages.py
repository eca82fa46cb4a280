"""The dashboard's pages (GET): overview, users, one user, sync. Only signed-in admins get here
(`auth.SessionSigner.guard`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from gateway.dashboard.auth import Endpoint, Session, SessionSigner
from gateway.dashboard.charts import refusal_chart, traffic_charts
from gateway.dashboard.polar_state import PolarProbe
from gateway.dashboard.render import page
from gateway.http_api import StoreUnavailable, from_store
from gateway.keys import USER_ID_RE
from gateway.meters import ALL_METERS
from gateway.quota import MeterStatus, meter_status, overall_status
from gateway.services import Services
from gateway.store.dashboard_base import Step, TrafficRow
from gateway.store.refusals_base import RefusalCount
from gateway.timeutil import utcnow

DAY_SPAN = timedelta(hours=24)
WEEKS_SPAN = timedelta(days=14)
RECENT_REQUESTS = 50
FAILED_SHOWN = 200

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class OutcomeTotal:
    outcome: str
    requests: int
    tokens: int


def _totals(rows: list[TrafficRow]) -> list[OutcomeTotal]:
    requests: dict[str, int] = defaultdict(int)
    tokens: dict[str, int] = defaultdict(int)
    for r in rows:
        requests[r.outcome] += r.requests
        tokens[r.outcome] += r.tokens
    return [OutcomeTotal(o, requests[o], tokens[o]) for o in sorted(requests, key=lambda o: (o != "ok", o))]


# What each refusal reason means (`BillingOwner._refused`, the proxy's 401, `RateLimited.reason`,
# the billing portal's 429).
REFUSAL_REASONS = {
    "invalid_key": "invalid or revoked gateway key",
    "quota": "over the quota of a meter",
    "requests": "too many requests per minute",
    "tokens": "too many tokens per minute",
    "unavailable": "rate limits could not be checked",
    "unrecordable": "the journal could not record the request",
    "store_unavailable": "the database did not answer: the quota could not be checked",
    "portal_rate_limited": "too many billing portal links per minute for the user",
    "portal_unavailable": "the limit on billing portal links could not be checked",
}


@dataclass(frozen=True, slots=True)
class RefusalTotal:
    status: int
    reason: str
    meaning: str
    count: int


def _refusal_totals(rows: list[RefusalCount]) -> list[RefusalTotal]:
    counts: dict[tuple[int, str], int] = defaultdict(int)
    for r in rows:
        counts[r.status, r.reason] += r.count
    return [RefusalTotal(st, why, REFUSAL_REASONS.get(why, ""), n) for (st, why), n in sorted(counts.items())]


@dataclass(frozen=True, slots=True)
class MeterBar:
    """A meter of the current period as the user page draws it (percentages of the credit)."""

    status: MeterStatus
    consumed_pct: float
    reserved_pct: float


def _bar(m: MeterStatus) -> MeterBar:
    if not m.credited:
        return MeterBar(m, 100.0 if m.credited == 0 and m.consumed else 0.0, 0.0)
    consumed = min(100.0, 100.0 * m.consumed / m.credited)
    return MeterBar(m, round(consumed, 2), round(min(100.0 - consumed, 100.0 * m.reserved / m.credited), 2))


def _int_param(request: Request, name: str) -> int | None:
    value = request.query_params.get(name, "")
    return int(value) if value.isascii() and value.isdigit() and len(value) < 12 else None


def unavailable_page(endpoint: Endpoint) -> Endpoint:
    """`endpoint`, answering a 503 page (the shape of the dashboard's other refusals) when a store call
    it made did not answer in time or failed (logged where it was given up on)."""

    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except StoreUnavailable as exc:
            response = page("message.html", 503, nav="", csrf="", title="Database unavailable", message=exc.message)
            response.headers["retry-after"] = "1"
            return response

    return answer


class Pages:
    def __init__(self, s: Services, signer: SessionSigner, probe: PolarProbe) -> None:
        self.s = s
        self.signer = signer
        self.probe = probe

    async def read(self, call: Coroutine[Any, Any, T], what: str) -> T:
        """A store call within the store timeout; StoreUnavailable (a 503 page, see `unavailable_page`) if not."""
        return await from_store(call, self.s.settings.store_timeout_seconds, f"dashboard: {what}")

    def _session(self, request: Request) -> Session:
        session = self.signer.session_of(request)
        assert session is not None  # (the guard let the request in)
        return session

    async def overview(self, request: Request) -> Response:
        now = utcnow()
        day_since, weeks_since = now - DAY_SPAN, now - WEEKS_SPAN
        hourly = await self.read(self.s.store.traffic(day_since, Step.HOUR), "the overview page")
        daily = await self.read(self.s.store.traffic(weeks_since, Step.DAY), "the overview page")
        refused_hourly = await self.read(self.s.store.refusals(day_since, Step.HOUR), "the overview page")
        refused_daily = await self.read(self.s.store.refusals(weeks_since, Step.DAY), "the overview page")
        return page(
            "overview.html",
            nav="overview",
            csrf=self._session(request).csrf,
            now=now,
            day_charts=traffic_charts(hourly, day_since, now, Step.HOUR),
            weeks_charts=traffic_charts(daily, weeks_since, now, Step.DAY),
            day_totals=_totals(hourly),
            weeks_totals=_totals(daily),
            day_refusals=refusal_chart(refused_hourly, day_since, now, Step.HOUR),
            weeks_refusals=refusal_chart(refused_daily, weeks_since, now, Step.DAY),
            day_refusal_totals=_refusal_totals(refused_hourly),
            refusals_unstored=self.s.refusals.pending,
            backlog=await self.read(self.s.store.sync_backlog(), "the overview page"),
            last_synced_at=await self.read(self.s.store.last_synced_at(weeks_since), "the overview page"),
            unstored=self.s.recorder.backlog,
            polar=await self.probe.state(),
        )

    async def users(self, request: Request) -> Response:
        text = request.query_params.get("q", "").replace("\x00", "").strip()[:128]
        found = await self.read(self.s.store.search_users(text, limit=100), "the users page")
        return page(
            "users.html",
            nav="users",
            csrf=self._session(request).csrf,
            q=text,
            users=found,
            can_open=bool(USER_ID_RE.fullmatch(text)) and all(u.user_id != text for u in found),
        )

    async def user(self, request: Request, new_key: str | None = None, status: int = 200) -> Response:
        user_id = request.path_params["user_id"]
        if not USER_ID_RE.fullmatch(user_id):
            csrf = self._session(request).csrf
            return page("message.html", 404, nav="users", csrf=csrf, title="No such user", message="Invalid user id.")
        what = f"the page of user {user_id}"
        quota = await self.read(self.s.ledger.snapshot(user_id), what)
        cfg = self.s.settings.file.status
        meters = [meter_status(name, quota.meter(name), cfg.warning, cfg.critical) for name in ALL_METERS]
        return page(
            "user.html",
            status,
            nav="users",
            csrf=self._session(request).csrf,
            user_id=user_id,
            overall=overall_status(meters),
            bars=[_bar(m) for m in meters],
            quota=quota,
            keys=await self.read(self.s.store.list_keys(user_id), what),
            requests=await self.read(self.s.store.recent_requests(user_id, RECENT_REQUESTS), what),
            new_key=new_key,
            revoked=request.query_params.get("revoked", ""),
        )

    async def sync(self, request: Request) -> Response:
        now = utcnow()
        return page(
            "sync.html",
            nav="sync",
            csrf=self._session(request).csrf,
            backlog=await self.read(self.s.store.sync_backlog(), "the sync page"),
            last_synced_at=await self.read(self.s.store.last_synced_at(now - WEEKS_SPAN), "the sync page"),
            failed=await self.read(self.s.store.failed_events(FAILED_SHOWN), "the sync page"),
            shown=FAILED_SHOWN,
            requeued=_int_param(request, "requeued"),
            polar_on=self.s.polar is not None,
        )
