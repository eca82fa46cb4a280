"""Refusals through the official SDKs, counted per hour: stored in the background, shown on the
overview (charts and the 24-hour table), kept through a failing store, flushed at shutdown."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import anthropic
import httpx
import pytest
from google import genai
from google.genai import errors, types

from gateway.settings import RateLimitConfig
from gateway.store.refusals_base import hour_start
from gateway.timeutil import iso, utcnow
from tests.conftest import Gateway, wait_until
from tests.support_dashboard import signed_in

MSG = [{"role": "user", "content": "Hello"}]
CLAUDE = "claude-sonnet-4-6"


def claude(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)


def gemini(gw: Gateway, key: str) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=f"{gw.url}/gemini"))


def stored(gw: Gateway) -> dict[tuple[int, str], int]:
    """The stored counts by status and reason, over every hour."""
    rows = gw.query("SELECT status, reason, SUM(count) FROM refusals GROUP BY status, reason")
    return {(int(status), reason): int(n) for status, reason, n in rows}


def refuse_through_the_sdks(gw: Gateway) -> None:
    """3 x 401 (both SDKs), 3 x 402, then 2 x 429 (the fourth and fifth request of the minute)."""
    key = gw.issue_key("rex")
    with pytest.raises(anthropic.AuthenticationError):
        claude(gw, "pgw_wrong").messages.create(model=CLAUDE, max_tokens=16, messages=MSG)  # type: ignore[arg-type]
    wrong = gemini(gw, "pgw_wrong")  # (held: a client dropped at once closes its connection pool)
    for _ in range(2):
        with pytest.raises(errors.ClientError) as err:
            wrong.models.generate_content(model="gemini-2.5-flash", contents="Hi")
        assert err.value.code == 401
    for _ in range(3):
        with pytest.raises(anthropic.PaymentRequiredError):
            claude(gw, key).messages.create(model=CLAUDE, max_tokens=100, messages=MSG)  # type: ignore[arg-type]
    with pytest.raises(anthropic.RateLimitError):
        claude(gw, key).messages.create(model=CLAUDE, max_tokens=1, messages=MSG)  # type: ignore[arg-type]
    right = gemini(gw, key)
    with pytest.raises(errors.ClientError) as err:
        right.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    assert err.value.code == 429


EXPECTED = {(401, "invalid_key"): 3, (402, "quota"): 3, (429, "requests"): 2}
LIMITED = {"plan": {"claude_output_tokens": 10}, "rate_limit": RateLimitConfig(requests_per_minute=3)}


def chart_counts(html: str, chart_id: str) -> Counter[int]:
    """Refusals per status as a chart's bars say (summed over its bars)."""
    svg = html.split(f'id="{chart_id}"', 1)[1].split("</svg>", 1)[0]
    counts: Counter[int] = Counter()
    for kind, n, status in re.findall(
        r'<rect class="s(\d+)"[^>]*><title>[^<]*: ([\d,]+) refused with (\d+)</title>', svg
    ):
        assert kind == status
        counts[int(status)] += int(n.replace(",", ""))
    return counts


def test_refusals_through_the_sdks_are_stored_and_shown_on_the_overview(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(**LIMITED, refusals_flush_seconds=0.05)
    began = hour_start(utcnow())
    refuse_through_the_sdks(gw)
    wait_until(lambda: stored(gw) == EXPECTED)
    hours = {h for (h,) in gw.query("SELECT DISTINCT hour FROM refusals")}
    assert hours <= {iso(began), iso(began + timedelta(hours=1))} and hours  # (two if the hour turned meanwhile)
    with signed_in(gw) as client:
        html = client.get("/admin").text
    table = html.split('id="refusals-24h"', 1)[1].split("</table>", 1)[0]
    assert re.findall(r"<tr><td>(\d+)</td><td>(\w+)</td><td>([\w ]+)</td><td class=\"num\">(\d+)</td></tr>", table) == [
        ("401", "invalid_key", "invalid or revoked gateway key", "3"),
        ("402", "quota", "over the quota of a meter", "3"),
        ("429", "requests", "too many requests per minute", "2"),
    ]
    want = Counter({401: 3, 402: 3, 429: 2})
    assert chart_counts(html, "chart-refusals-hourly") == want
    assert chart_counts(html, "chart-refusals-daily") == want
    assert 'class="key s401">401 invalid key</span>' in html
    assert 'id="refusals-unstored"' not in html  # everything counted is stored


def test_the_last_counts_are_stored_at_shutdown(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(**LIMITED, refusals_flush_seconds=3600)  # no flush but the one at shutdown
    refuse_through_the_sdks(gw)
    assert stored(gw) == {} and gw.services.refusals.pending == 8
    with signed_in(gw) as client:
        assert (
            '<span id="refusals-unstored">(8 counted in this process, not stored yet)</span>'
            in client.get("/admin").text
        )
    gw.server.stop()
    assert stored(gw) == EXPECTED


def test_a_failing_store_keeps_the_counts_and_refusals_are_still_answered(
    make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    gw = make_gateway(refusals_flush_seconds=0.02)
    caplog.set_level(logging.WARNING, "gateway.refusals")
    if gw.db.is_postgres:
        gw.query("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE 'no'; END $$")
        gw.query("CREATE TRIGGER refuse BEFORE INSERT ON refusals FOR EACH ROW EXECUTE FUNCTION refuse()")
    else:
        gw.query("CREATE TRIGGER refuse BEFORE INSERT ON refusals BEGIN SELECT RAISE(ABORT, 'no'); END")
    registry = gw.services.metrics.registry

    def failed_flushes() -> float:
        return registry.get_sample_value("gateway_store_errors_total", {"operation": "add_refusals"}) or 0.0

    wrong = {"authorization": "Bearer pgw_wrong"}
    statuses = [httpx.post(f"{gw.url}/anthropic/v1/messages", headers=wrong, json={}).status_code for _ in range(5)]
    assert statuses == [401] * 5
    wait_until(lambda: failed_flushes() >= 3)  # tried and failed again and again
    assert stored(gw) == {} and gw.services.refusals.failing
    gw.query("DROP TRIGGER refuse ON refusals" if gw.db.is_postgres else "DROP TRIGGER refuse")
    wait_until(lambda: stored(gw) == {(401, "invalid_key"): 5} and not gw.services.refusals.failing)
    warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.refusals" and r.levelno >= logging.WARNING]
    assert warnings == ["could not store refusal counts (no): kept for the next try"]
