"""Bar charts of traffic and refusals as plain geometry, drawn as inline SVG by the templates (no JS library)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from gateway.outcomes import Outcome
from gateway.store.dashboard_base import Step, TrafficRow
from gateway.store.refusals_base import RefusalCount

WIDTH, HEIGHT = 720, 160
LEFT, BOTTOM, TOP = 56, 18, 8  # room for the axis labels
_STEP = {Step.HOUR: timedelta(hours=1), Step.DAY: timedelta(days=1)}
# What each refusal status means, in the order its bars stack (CSS classes s401 ...).
REFUSAL_STATUSES = {401: "invalid key", 402: "quota", 429: "rate limited", 503: "cannot bill now"}


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    w: float
    h: float
    kind: str  # CSS class: ok | error | tokens | s401 | s402 | s429 | s503
    title: str  # the tooltip


@dataclass(frozen=True, slots=True)
class Label:
    x: float
    text: str


@dataclass(frozen=True, slots=True)
class Legend:
    kind: str  # the CSS class of the bars it names
    text: str


@dataclass(slots=True)
class Chart:
    title: str
    top: int  # the value at the top of the y axis
    bars: list[Bar] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    legend: list[Legend] = field(default_factory=list)
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    bottom: int = BOTTOM
    plot_top: int = TOP


def floor(dt: datetime, step: Step) -> datetime:
    dt = dt.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return dt.replace(hour=0) if step is Step.DAY else dt


def bucket_starts(since: datetime, now: datetime, step: Step) -> list[datetime]:
    starts, t = [], floor(since, step)
    while t <= now:
        starts.append(t)
        t += _STEP[step]
    return starts


def _label(t: datetime, step: Step) -> str:
    return t.strftime("%H:00") if step is Step.HOUR else t.strftime("%m-%d")


def _frame(starts: Sequence[datetime], step: Step) -> list[tuple[float, float, str, bool]]:
    """Per bucket: its bar's x and width, its label, and whether the x axis shows the label."""
    slot = (WIDTH - LEFT) / max(len(starts), 1)
    every = max(1, len(starts) // 8)  # about eight labels on the x axis
    return [(LEFT + i * slot + 1, max(slot - 2, 1), _label(t, step), i % every == 0) for i, t in enumerate(starts)]


def traffic_charts(rows: Sequence[TrafficRow], since: datetime, now: datetime, step: Step) -> tuple[Chart, Chart]:
    """Requests (ok and failed stacked) and tokens, one bar per hour or day from `since` to `now`."""
    starts = bucket_starts(since, now, step)
    ok = dict.fromkeys(starts, 0)
    failed = dict.fromkeys(starts, 0)
    tokens = dict.fromkeys(starts, 0)
    for r in rows:
        t = floor(r.start, step)
        if t not in ok:
            continue
        (ok if r.outcome == Outcome.OK else failed)[t] += r.requests
        tokens[t] += r.tokens
    span = "hour" if step is Step.HOUR else "day"
    requests = Chart(f"Requests per {span}", max([ok[t] + failed[t] for t in starts] + [1]))
    token_chart = Chart(f"Tokens per {span}", max([*tokens.values(), 1]))
    scale_req = (HEIGHT - BOTTOM - TOP) / requests.top
    scale_tok = (HEIGHT - BOTTOM - TOP) / token_chart.top
    base = HEIGHT - BOTTOM
    for t, (x, w, when, labelled) in zip(starts, _frame(starts, step), strict=True):
        h_ok, h_failed = ok[t] * scale_req, failed[t] * scale_req
        if ok[t]:
            requests.bars.append(Bar(x, base - h_ok, w, h_ok, "ok", f"{when}: {ok[t]} ok"))
        if failed[t]:
            requests.bars.append(Bar(x, base - h_ok - h_failed, w, h_failed, "error", f"{when}: {failed[t]} failed"))
        if tokens[t]:
            h = tokens[t] * scale_tok
            token_chart.bars.append(Bar(x, base - h, w, h, "tokens", f"{when}: {tokens[t]:,} tokens"))
        if labelled:
            for chart in (requests, token_chart):
                chart.labels.append(Label(x, when))
    return requests, token_chart


def refusal_chart(rows: Sequence[RefusalCount], since: datetime, now: datetime, step: Step) -> Chart:
    """Refused requests stacked by status (`REFUSAL_STATUSES` order), one bar per hour or day."""
    starts = bucket_starts(since, now, step)
    per: dict[datetime, dict[int, int]] = {t: dict.fromkeys(REFUSAL_STATUSES, 0) for t in starts}
    for r in rows:
        bucket = per.get(floor(r.start, step))
        if bucket is not None and r.status in bucket:
            bucket[r.status] += r.count
    span = "hour" if step is Step.HOUR else "day"
    chart = Chart(
        f"Refused requests per {span}",
        max([sum(per[t].values()) for t in starts] + [1]),
        legend=[Legend(f"s{status}", f"{status} {what}") for status, what in REFUSAL_STATUSES.items()],
    )
    scale = (HEIGHT - BOTTOM - TOP) / chart.top
    for t, (x, w, when, labelled) in zip(starts, _frame(starts, step), strict=True):
        y = float(HEIGHT - BOTTOM)
        for status, n in per[t].items():
            if n:
                h = n * scale
                y -= h
                chart.bars.append(Bar(x, y, w, h, f"s{status}", f"{when}: {n:,} refused with {status}"))
        if labelled:
            chart.labels.append(Label(x, when))
    return chart
