"""GET /metrics: exact counts as requests, refusals, syncs and webhooks happen; guarded; bounded labels."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import pytest
from google import genai
from google.genai import errors, types
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics as gateway_metrics
from gateway.settings import ConfigError, RateLimitConfig, settings_from_env
from tests.conftest import ADMIN_TOKEN, Gateway, GatewayProcess, process_env, wait_until
from tests.fakes.polar import FakePolar, new_standard_secret, sign_webhook, webhook_payload
from tests.fakes.upstream import FakeUpstream

MSG = [{"role": "user", "content": "Hello"}]
SECRET = new_standard_secret()
INGEST = "/v1/events/ingest"
LABELS = {"provider", "route", "status", "meter", "reason", "cause", "type", "outcome", "state", "le"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, token: str | None = ADMIN_TOKEN) -> Samples:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    resp = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def claude(url: str, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{url}/anthropic", api_key=key, max_retries=0)


def test_requests_usage_and_timings_count_exactly(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway()
    key = gw.issue_key("mia")
    before = scrape(gw.url)
    c = claude(gw.url, key)
    for _ in range(2):
        c.messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)  # type: ignore[arg-type]
    g = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=f"{gw.url}/gemini"))
    g.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    with pytest.raises(anthropic.AuthenticationError):
        claude(gw.url, "pgw_wrong").messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)  # type: ignore[arg-type]
    assert httpx.get(f"{gw.url}/anthropic/v1/nothing/here").status_code == 404
    gw.wait_recorded("mia", 3)
    after = scrape(gw.url)

    assert delta(after, before, "gateway_requests_total", provider="anthropic", route="messages", status="200") == 2
    assert delta(after, before, "gateway_requests_total", provider="gemini", route="generate", status="200") == 1
    assert delta(after, before, "gateway_requests_total", provider="anthropic", route="messages", status="401") == 1
    assert delta(after, before, "gateway_requests_total", provider="anthropic", route="unmatched", status="404") == 1
    assert delta(after, before, "gateway_refusals_total", status="401", reason="invalid_key") == 1
    for meter, total in gw.events("mia").items():  # exactly what was billed, by meter
        assert delta(after, before, "gateway_usage_total", meter=meter) == total
    assert sum(delta(after, before, "gateway_usage_total", meter=m) for m in ("claude_input_tokens",)) == 2 * 12
    assert delta(after, before, "gateway_usage_total", meter="claude_output_tokens") == 2 * 9
    for provider, n in (("anthropic", 2), ("gemini", 1)):
        assert delta(after, before, "gateway_overhead_seconds_count", provider=provider) == n
        assert delta(after, before, "gateway_upstream_ttfb_seconds_count", provider=provider) == n
        assert value(after, "gateway_overhead_seconds_bucket", provider=provider, le="+Inf") == n
    assert value(after, "gateway_reservations_in_flight") == 0
    assert value(after, "gateway_sync_backlog_requests", state="pending") == 3  # no Polar: they wait
    assert 0 <= value(after, "gateway_sync_oldest_pending_age_seconds") < 60


def test_refusals_count_by_reason(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(
        plan={"claude_output_tokens": 10}, rate_limit=RateLimitConfig(requests_per_minute=3, tokens_per_minute=None)
    )
    key = gw.issue_key("ned")
    before = scrape(gw.url)
    c = claude(gw.url, key)
    for _ in range(3):
        with pytest.raises(anthropic.PaymentRequiredError):
            c.messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=MSG)  # type: ignore[arg-type]
    with pytest.raises(anthropic.RateLimitError):
        c.messages.create(model="claude-sonnet-4-6", max_tokens=1, messages=MSG)  # type: ignore[arg-type]
    g = genai.Client(api_key="pgw_wrong", http_options=types.HttpOptions(base_url=f"{gw.url}/gemini"))
    with pytest.raises(errors.ClientError):
        g.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    after = scrape(gw.url)
    assert delta(after, before, "gateway_refusals_total", status="402", reason="quota") == 3
    assert delta(after, before, "gateway_refusals_total", status="429", reason="requests") == 1
    assert delta(after, before, "gateway_refusals_total", status="401", reason="invalid_key") == 1
    assert delta(after, before, "gateway_requests_total", provider="anthropic", route="messages", status="402") == 3
    assert delta(after, before, "gateway_requests_total", provider="anthropic", route="messages", status="429") == 1
    assert delta(after, before, "gateway_requests_total", provider="gemini", route="generate", status="401") == 1
    assert delta(after, before, "gateway_overhead_seconds_count", provider="anthropic") == 0  # none forwarded
    assert value(after, "gateway_reservations_in_flight") == 0


def test_sync_failures_webhooks_and_backlog(make_gateway: Callable[..., Gateway], fake: FakePolar) -> None:
    gw = make_gateway(
        polar_access_token=fake.token,
        polar_base_url=fake.url,
        polar_webhook_secret=SECRET,
        sync_interval_seconds=300,
        sync_batch_size=2,  # a recorded request (two events) wakes the sync, and goes in one batch
        sync_backoff_seconds=0.05,
        sync_backoff_max_seconds=0.1,
        sync_max_attempts=1,  # a rejected request is parked at once, not retried
    )
    key = gw.issue_key("u-ola-7")
    before = scrape(gw.url)
    fake.fail_next(1, 503, path=INGEST)
    claude(gw.url, key).messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)  # type: ignore[arg-type]
    wait_until(lambda: len(fake.events) == 2, timeout=20)
    wait_until(lambda: gw.query("SELECT COUNT(*) FROM requests WHERE sync_state = 'synced'") == [(1,)])
    fake.reject_when(lambda event: "rejected on purpose")
    claude(gw.url, key).messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)  # type: ignore[arg-type]
    wait_until(
        lambda: gw.query("SELECT sync_state FROM requests WHERE sync_state != 'synced'") == [("failed",)], timeout=20
    )

    state = webhook_payload("customer.state_changed", fake.state_payload("u-ola-7"))
    body, headers = sign_webhook(state, SECRET, legacy=False)
    sent = [httpx.post(f"{gw.url}/webhooks/polar", content=body, headers=headers) for _ in range(2)]
    assert [r.json()["status"] for r in sent] == ["updated", "duplicate"]
    forged, forged_headers = sign_webhook(state, new_standard_secret(), legacy=False)
    assert httpx.post(f"{gw.url}/webhooks/polar", content=forged, headers=forged_headers).status_code == 403
    unknown, unknown_headers = sign_webhook(webhook_payload("made.up", {}), SECRET, legacy=False)
    assert httpx.post(f"{gw.url}/webhooks/polar", content=unknown, headers=unknown_headers).status_code == 202
    after = scrape(gw.url)

    assert delta(after, before, "gateway_sync_failures_total", cause="unavailable") == 1
    assert delta(after, before, "gateway_sync_failures_total", cause="rejected") == 1
    assert delta(after, before, "gateway_sync_attempts_total") == 3  # 503, taken, rejected
    changed = "customer.state_changed"
    assert delta(after, before, "gateway_webhooks_total", type=changed, outcome="updated") == 1
    assert delta(after, before, "gateway_webhooks_total", type=changed, outcome="duplicate") == 1
    assert delta(after, before, "gateway_webhooks_total", type="other", outcome="invalid_signature") == 1
    assert delta(after, before, "gateway_webhooks_total", type="other", outcome="ignored") == 1
    assert value(after, "gateway_sync_backlog_requests", state="pending") == 0
    assert value(after, "gateway_sync_backlog_requests", state="failed") == 1
    assert value(after, "gateway_sync_oldest_pending_age_seconds") == 0
    text = httpx.get(f"{gw.url}/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}).text
    for secret in (key, fake.token, SECRET, ADMIN_TOKEN, "u-ola-7", "rejected on purpose"):
        assert secret not in text
    names = {label for (_, labels) in after for label, _ in labels}
    assert names <= LABELS


@pytest.mark.parametrize("mode", ["open", "admin", "off"])
def test_metrics_guarded_as_configured(make_gateway: Callable[..., Gateway], mode: str) -> None:
    gw = make_gateway(metrics=mode)
    bare = httpx.get(f"{gw.url}/metrics")
    admin = httpx.get(f"{gw.url}/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    wrong = httpx.get(f"{gw.url}/metrics", headers={"authorization": "Bearer nope"})
    expected = {"open": (200, 200, 200), "admin": (401, 200, 401), "off": (404, 404, 404)}[mode]
    assert (bare.status_code, admin.status_code, wrong.status_code) == expected
    if mode != "off":
        assert "gateway_requests_total" in admin.text or "gateway_requests" in admin.text


def test_store_errors_are_counted(make_gateway: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    gw = make_gateway()
    if gw.settings.is_postgres:
        pytest.skip("the refusing trigger is SQLite's")
    key = gw.issue_key("pia")
    before = scrape(gw.url)
    gw.query(
        "CREATE TRIGGER refuse BEFORE INSERT ON requests WHEN NEW.user_id = 'pia' BEGIN SELECT RAISE(ABORT, 'no'); END"
    )
    claude(gw.url, key).messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)  # type: ignore[arg-type]
    wait_until(lambda: delta(scrape(gw.url), before, "gateway_store_errors_total", operation="finish_request") >= 1)
    after = scrape(gw.url)
    assert delta(after, before, "gateway_store_errors_total", operation="finish_requests") >= 1
    assert value(after, "gateway_reservations_in_flight") == 0
    # A refusal for what the record holds (a constraint) is not retried: the journal keeps it for the
    # next start, which stores it or sets it aside (tests/test_quarantine.py).
    assert gw.requests("pia") == []


def test_multiprocess_mode_serves_every_process_metrics(
    tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"stale")
    # prepare_multiprocess switches this process to file-backed values: restored after the test
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.setenv(gateway_metrics.MULTIPROC_ENV, str(directory))
    assert gateway_metrics.prepare_multiprocess(1) is None
    assert gateway_metrics.prepare_multiprocess(2) == str(directory)
    assert list(directory.iterdir()) == []  # an earlier run's values are gone
    monkeypatch.delenv(gateway_metrics.MULTIPROC_ENV)
    made = gateway_metrics.prepare_multiprocess(3)
    assert made is not None and Path(made).is_dir() and os.environ[gateway_metrics.MULTIPROC_ENV] == made
    shutil.rmtree(made)

    env = process_env(tmp_path / "mp.db", upstream, GATEWAY_METRICS="open", PROMETHEUS_MULTIPROC_DIR=str(directory))
    gw = GatewayProcess(env).start()
    try:
        key = gw.issue_key("quy")
        claude(gw.url, key).messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)  # type: ignore[arg-type]
        after = scrape(gw.url, None)
        assert value(after, "gateway_requests_total", provider="anthropic", route="messages", status="200") == 1
        assert value(after, "gateway_usage_total", meter="claude_output_tokens") == 9
        assert value(after, "gateway_reservations_in_flight") == 0
        assert any(p.name.startswith("counter_") for p in directory.iterdir())  # the values live in files
    finally:
        gw.stop()
    assert not list(directory.glob("gauge_livesum_*.db"))  # a stopped process's live gauges are gone


def test_metrics_setting_is_checked() -> None:
    assert settings_from_env({}, load_file=False).metrics == "admin"
    assert settings_from_env({"GATEWAY_METRICS": "open"}, load_file=False).metrics == "open"
    with pytest.raises(ConfigError, match="GATEWAY_METRICS must be one of open, admin, off, got 'public'"):
        settings_from_env({"GATEWAY_METRICS": "public"}, load_file=False)
