"""Polar outages end to end: the gateway serves through them and its usage reaches Polar by itself."""

from __future__ import annotations

from collections.abc import Callable

import anthropic

from tests.conftest import Gateway, run_cli, wait_until
from tests.fakes.polar import FakePolar

MSG = [{"role": "user", "content": "Hello"}]
INGEST = "/v1/events/ingest"


def ask(gw: Gateway, key: str, n: int) -> None:
    client = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
    for _ in range(n):
        client.messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)  # type: ignore[arg-type]


def test_polar_failing_for_several_rounds_heals_with_the_default_settings(
    make_gateway: Callable[..., Gateway], fake: FakePolar
) -> None:
    """Default sync settings but the interval (so the first pass comes soon): 5xx, 429 with
    Retry-After and a refused token, one per pass, then every event arrives, none parked."""
    gw = make_gateway(polar_access_token=fake.token, polar_base_url=fake.url, sync_interval_seconds=0.2)
    key = gw.issue_key("carol")
    fake.fail_next(1, 503, path=INGEST)
    fake.fail_next(1, 429, retry_after=1, path=INGEST)
    fake.fail_next(1, 401, path=INGEST)
    ask(gw, key, 4)
    wait_until(lambda: len(fake.events) == 8, timeout=20, interval=0.05)
    assert len(fake.ingest_bodies()) >= 4  # three failed passes, then the delivery
    assert max(fake.sent.values()) == 4  # the first request's events: three passes refused, one taken
    assert fake.total("claude_input_tokens", "carol") == 4 * 12
    assert fake.total("claude_output_tokens", "carol") == 4 * 9
    states = "SELECT sync_state, attempts, COUNT(*) FROM requests GROUP BY 1, 2"
    wait_until(lambda: gw.query(states) == [("synced", 0, 4)])


def test_gateway_sync_after_an_outage_sends_everything_and_exits_0(
    make_gateway: Callable[..., Gateway], fake: FakePolar
) -> None:
    """The gateway's own retry is minutes away (a long backoff); `gateway sync` sends now."""
    gw = make_gateway(
        polar_access_token=fake.token,
        polar_base_url=fake.url,
        sync_interval_seconds=0.2,
        sync_backoff_seconds=300.0,
    )
    key = gw.issue_key("dave")
    fake.down(True, refuse=True)
    ask(gw, key, 3)
    # All three stored, and the gateway's own pass failed (a pass that ran between two requests saw only
    # some of them: the rest wait out the backoff untried).
    failed = "SELECT COUNT(*) AS stored, COUNT(*) FILTER (WHERE last_error != '') AS failed FROM requests"
    wait_until(lambda: (row := gw.query(failed)[0])[0] == 3 and row[1] >= 1, timeout=10)
    fake.down(False)
    env = {
        "GATEWAY_DATABASE_URL": gw.settings.database_url,
        "POLAR_ACCESS_TOKEN": fake.token,
        "POLAR_BASE_URL": fake.url,
    }
    out = run_cli(env, "sync")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sent 6 event(s) to Polar (6 new, 0 already there)" in out.stdout
    assert "outbox: 0 pending, 0 failed" in out.stdout
    assert fake.token not in out.stdout + out.stderr
    assert fake.total("claude_input_tokens", "dave") == 3 * 12
    assert fake.total("claude_output_tokens", "dave") == 3 * 9
    assert gw.query("SELECT sync_state, attempts, COUNT(*) FROM requests GROUP BY 1, 2") == [("synced", 0, 3)]
