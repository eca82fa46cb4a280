"""Keys through the admin API and the CLI; revocation; legacy SDK requests replayed verbatim."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, FIXTURES, Gateway
from tests.conftest import run_cli as _cli
from tests.support_db import Databases

MSG = [{"role": "user", "content": "Hello"}]
ROOT = Path(__file__).resolve().parents[2]


def test_admin_api_requires_token(gateway: Gateway) -> None:
    assert httpx.post(f"{gateway.url}/admin/keys", json={"user_id": "a"}).status_code == 401
    bad = {"authorization": "Bearer wrong"}
    assert httpx.get(f"{gateway.url}/admin/keys", headers=bad).status_code == 401


def test_wrong_admin_tokens_are_refused_per_address_after_ten(gateway: Gateway) -> None:
    good = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    for n in range(9):
        assert httpx.get(f"{gateway.url}/admin/keys", headers={"authorization": f"Bearer guess{n}"}).status_code == 401
    assert httpx.get(f"{gateway.url}/admin/keys", headers=good).status_code == 200  # a success forgets them
    for n in range(10):
        assert httpx.get(f"{gateway.url}/admin/keys", headers={"authorization": f"Bearer guess{n}"}).status_code == 401
    refused = httpx.post(f"{gateway.url}/admin/keys", json={"user_id": "a"}, headers=good)
    assert refused.status_code == 429 and 590 <= int(refused.headers["retry-after"]) <= 600
    assert gateway.query("SELECT COUNT(*) FROM api_keys") == [(0,)]  # nothing was created


def test_admin_create_list_revoke(gateway: Gateway) -> None:
    with gateway.admin() as admin:
        created = admin.post("/admin/keys", json={"user_id": "zoe", "name": "web"})
        assert created.status_code == 201
        body = created.json()
        key, key_id = body["key"], body["id"]
        assert key.startswith("pgw_") and body["prefix"] == key[:12] and body["user_id"] == "zoe"
        listed = admin.get("/admin/keys", params={"user_id": "zoe"}).json()["data"]
        assert [k["id"] for k in listed] == [key_id]
        assert key not in json.dumps(listed)
        # the key works, then is refused at once after revocation
        c = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=key, max_retries=0)
        c.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=MSG)  # type: ignore[arg-type]
        assert admin.delete(f"/admin/keys/{key_id}").json() == {"id": key_id, "revoked": True}
        with pytest.raises(anthropic.AuthenticationError):
            c.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=MSG)  # type: ignore[arg-type]
        assert admin.delete(f"/admin/keys/{key_id}").status_code == 404
        assert admin.post("/admin/keys", json={"user_id": "bad/id"}).status_code == 400
        assert admin.post("/admin/keys", content=b"{nope").status_code == 400
    # keys are stored hashed
    stored = gateway.query("SELECT key_hash FROM api_keys")
    assert all(key.encode() not in bytes(r[0]) for r in stored)


def test_key_hash_not_key_in_database(gateway: Gateway) -> None:
    key = gateway.issue_key("hash")
    raw = gateway.db_path.read_bytes()
    assert key.encode() not in raw


def _db_env(tmp_path: Path, databases: Databases, name: str) -> dict[str, str]:
    return {"GATEWAY_DATABASE_URL": databases.new(name).url, "GATEWAY_JOURNAL_DIR": str(tmp_path / f"{name}.journal")}


def test_cli_keys(tmp_path: Path, databases: Databases) -> None:
    env = _db_env(tmp_path, databases, "cli")
    out = _cli(env, "keys", "create", "--user", "alice")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("pgw_")
    out = _cli(env, "keys", "create", "--user", "alice", "--json")
    data = json.loads(out.stdout)
    assert set(data) == {"id", "key", "user_id"} and data["user_id"] == "alice"
    listed = _cli(env, "keys", "list", "--user", "alice", "--json")
    rows = json.loads(listed.stdout)
    assert len(rows) == 2 and key not in listed.stdout and data["key"] not in listed.stdout
    assert _cli(env, "keys", "revoke", data["id"]).returncode == 0
    assert _cli(env, "keys", "revoke", data["id"]).returncode == 1
    bad = _cli(env, "keys", "create", "--user", "a b")
    assert bad.returncode == 2 and "invalid user id" in bad.stderr


def test_cli_bad_config_fails_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("[plan]\nclaude_input_tokens = 'lots'\n")
    out = _cli({"GATEWAY_CONFIG": str(cfg)}, "migrate")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"configuration error: {cfg}: [plan] claude_input_tokens must be a non-negative integer, got 'lots'"
    ]
    cfg.write_text("[plan]\nclaude_tokens = 1\n")
    assert "unknown meter 'claude_tokens'" in _cli({"GATEWAY_CONFIG": str(cfg)}, "migrate").stderr
    cfg.write_text("[rate_limit]\nrequests_per_min = 1\n")
    assert "unknown key 'requests_per_min'" in _cli({"GATEWAY_CONFIG": str(cfg)}, "migrate").stderr
    out = _cli({"GATEWAY_PORT": "eighty"}, "migrate")
    assert out.stderr.strip() == "configuration error: GATEWAY_PORT must be int, got 'eighty'"
    out = _cli({"POLAR_ENVIRONMENT": "staging"}, "migrate")
    assert "POLAR_ENVIRONMENT must be 'sandbox' or 'production'" in out.stderr


def _captures(name: str) -> list[dict[str, object]]:
    lines = (FIXTURES / "captures" / name).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.parametrize("capture", ["requests_legacy.jsonl", "requests_current.jsonl"])
def test_captured_sdk_requests_replayed(gateway: Gateway, capture: str) -> None:
    """Every create/stream/generate request the SDKs were seen sending, replayed with a gateway key."""
    key = gateway.issue_key("replay")
    served = 0
    for req in _captures(capture):
        path, method = str(req["path"]), str(req["method"])
        anthropic_call = path == "/v1/messages"
        gemini_call = path.endswith((":generateContent", ":streamGenerateContent"))
        if method != "POST" or not (anthropic_call or gemini_call):
            continue
        headers = []
        for name, value in req["headers"]:  # type: ignore[attr-defined]
            lname = name.lower()
            if lname in ("host", "content-length"):
                continue
            if lname == "x-api-key" or lname == "x-goog-api-key":
                value = key
            elif lname == "authorization":
                value = f"Bearer {key}"
            headers.append((name, value))
        prefix = "/anthropic" if anthropic_call else "/gemini"
        query = f"?{req['query']}".replace("key=AIzaTESTKEY", f"key={key}") if req["query"] else ""
        resp = httpx.post(
            f"{gateway.url}{prefix}{path}{query}", content=str(req["body_raw"]).encode(), headers=headers, timeout=10
        )
        assert resp.status_code == 200, (path, resp.text)
        served += 1
    assert served >= 4
    rows = gateway.wait_recorded("replay", served)
    assert all(r["outcome"] == "ok" for r in rows)


def test_admin_token_is_needed_for_admin(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(admin_token="")
    resp = httpx.post(f"{gw.url}/admin/keys", json={"user_id": "x"}, headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert resp.status_code == 503


def test_cli_polar_setup_sync_usage_and_customer(tmp_path: Path, databases: Databases) -> None:
    from tests.fakes.polar import FakePolar

    db = databases.new("p")
    with FakePolar() as polar:
        env = {
            "GATEWAY_DATABASE_URL": db.url,
            "GATEWAY_JOURNAL_DIR": str(tmp_path / "p.journal"),
            "POLAR_ACCESS_TOKEN": polar.token,
            "POLAR_BASE_URL": polar.url,
        }
        first = _cli(env, "polar", "setup")
        assert first.returncode == 0, first.stderr
        assert len(polar.meters) == 10  # 6 Claude meters, 4 Gemini ones
        again = _cli(env, "polar", "setup")
        assert again.returncode == 0 and len(polar.meters) == 10
        assert polar.token not in first.stdout + first.stderr + again.stdout
        out = _cli(env, "keys", "create", "--user", "alice", "--email", "alice@example.com", "--json")
        assert out.returncode == 0, out.stderr
        assert polar.customers["alice"]["email"] == "alice@example.com"
        # one recorded event, synced by the CLI
        db.query(
            "INSERT INTO requests (id, user_id, key_id, provider, model, operation, stream, started_at, outcome,"
            " usage, sync_state) VALUES ('req_1', 'alice', 'k', 'anthropic', 'm', 'messages', FALSE,"
            " '2026-01-01T00:00:00.000000Z', 'ok', '{\"claude_input_tokens\": 7}', 'pending')"
        )
        polar.fail_next(1, 500, path="/v1/events/ingest")
        failed = _cli({**env, "GATEWAY_SYNC_MAX_ATTEMPTS": "1"}, "sync")
        assert failed.returncode == 1 and "stopped early: Polar server error 500" in failed.stdout
        usage = json.loads(_cli(env, "usage", "--json").stdout)
        assert usage == [  # an outage never parks
            {"user_id": "alice", "meter": "claude_input_tokens", "total": 7, "synced": 0, "pending": 1, "failed": 0}
        ]
        ok = _cli(env, "sync")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert polar.total("claude_input_tokens", "alice") == 7
    no_polar = _cli(_db_env(tmp_path, databases, "q"), "sync")
    assert no_polar.returncode == 2 and "POLAR_ACCESS_TOKEN" in no_polar.stdout + no_polar.stderr
