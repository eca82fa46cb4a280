"""The gateway's own API (admin, billing, webhooks): bounded bodies, one JSON error shape, no redirects."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.conftest import ADMIN_TOKEN, BodyCounter, Gateway, raw_request
from tests.fakes.upstream import FakeUpstream

MIB = 1024 * 1024


def test_streamed_webhook_body_is_refused_at_the_limit(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(polar_webhook_secret="whsec_" + "A" * 32)
    counter = BodyCounter(gw.app.app)
    gw.app.app = counter  # every own-API request now passes through the counter
    total, sent = 64, 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        chunk = b"x" * MIB
        for _ in range(total):
            sent += 1
            yield chunk

    # Chunked transfer, no content-length and no signature: nothing but the size can refuse it.
    resp = httpx.post(f"{gw.url}/webhooks/polar", content=chunks(), timeout=30)
    # The endpoint read a little past the limit (the server hands over what it has buffered), not all 64 MiB,
    # and the closed connection stopped the client before it sent everything.
    assert (resp.status_code, MIB < counter.read < 2 * MIB) == (413, True), counter.read
    assert sent < total
    assert resp.json() == {"error": {"type": "request_too_large", "message": f"request body exceeds {MIB} bytes"}}
    assert resp.headers["connection"] == "close"


def test_content_length_over_the_limit_is_413_before_reading(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(polar_webhook_secret="whsec_" + "A" * 32)
    for path, auth in (("/admin/keys", f"authorization: Bearer {ADMIN_TOKEN}\r\n"), ("/webhooks/polar", "")):
        # The body is announced but never sent: only an endpoint that trusts content-length answers.
        head = f"POST {path} HTTP/1.1\r\nhost: x\r\n{auth}content-length: {2 * MIB}\r\n\r\n".encode()
        answer = raw_request(gw.url, head)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        body = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body == {"error": {"type": "request_too_large", "message": f"request body exceeds {MIB} bytes"}}


def test_deeply_nested_admin_body_is_a_json_400(gateway: Gateway) -> None:
    with gateway.admin() as admin:
        resp = admin.post("/admin/keys", content=b"[" * 100_000, headers={"content-type": "application/json"})
        assert resp.status_code == 400
        assert resp.json()["error"]["type"] == "invalid_request"
        assert resp.json()["error"]["message"].startswith("malformed JSON body")
        resp = admin.post("/admin/keys", json={"user_id": 5})
        assert resp.json() == {
            "error": {"type": "invalid_request", "message": 'body must be {"user_id": "...", "name": "..."}'}
        }


def test_a_failing_store_is_a_json_503_and_any_other_failure_a_json_500(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway.query("DROP TABLE api_keys")  # the store now fails on every key query
    with gateway.admin() as admin:
        resp = admin.get("/admin/keys")
        assert resp.status_code == 503
        assert resp.json() == {
            "error": {"type": "unavailable", "message": "the gateway's database failed to answer; retry later"}
        }

        def broken(*args: object) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(gateway.services.admin_attempts, "check", broken)
        resp = admin.get("/admin/keys")
    assert resp.status_code == 500
    assert resp.json() == {"error": {"type": "internal_error", "message": "internal error"}}


def test_trailing_slash_is_a_json_404_not_a_redirect(gateway: Gateway) -> None:
    key = gateway.issue_key("slash")
    for path, token in (("/api/billing/status/", key), ("/admin/keys/", ADMIN_TOKEN)):
        resp = httpx.get(f"{gateway.url}{path}", headers={"authorization": f"Bearer {token}"})
        assert resp.status_code == 404
        assert resp.json() == {"error": {"type": "not_found", "message": f"GET {path}: not found"}}
    resp = httpx.get(f"{gateway.url}/api/billing/status", headers={"authorization": f"Bearer {key}"})
    assert resp.status_code == 200 and resp.json()["userId"] == "slash"


def test_gateway_routes_answer_json_errors(gateway: Gateway) -> None:
    resp = httpx.get(f"{gateway.url}/nope")
    assert resp.status_code == 404
    assert resp.json() == {"error": {"type": "not_found", "message": "GET /nope: not found"}}
    resp = httpx.delete(f"{gateway.url}/api/billing/status")
    assert resp.status_code == 405
    assert resp.json() == {
        "error": {"type": "method_not_allowed", "message": "DELETE /api/billing/status: method not allowed"}
    }
    resp = httpx.get(f"{gateway.url}/api/billing/status", headers={"authorization": "Bearer nope"})
    assert resp.json() == {"error": {"type": "authentication_error", "message": "invalid or revoked gateway key"}}
    assert httpx.get(f"{gateway.url}/healthz").json() == {
        "status": "ok",
        "unstored": 0,
        "sync": {"pending": 0, "failed": 0, "oldest_pending_age_seconds": None, "polar_ok": None},
    }


def test_model_name_cannot_rewrite_the_upstream_url(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.issue_key("path")
    gemini = {"x-goog-api-key": key}
    body = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}
    for model in ("x%3Falt=sse%26y=", "x%23y", "x%20y", "%2E%2E", "x%25y"):
        resp = httpx.post(f"{gateway.url}/gemini/v1beta/models/{model}:generateContent", headers=gemini, json=body)
        assert resp.status_code == 400, model
        assert resp.json()["error"]["status"] == "INVALID_ARGUMENT"
        resp = httpx.get(f"{gateway.url}/gemini/v1beta/models/{model}", headers=gemini)
        assert resp.status_code == 400, model
        resp = httpx.get(f"{gateway.url}/anthropic/v1/models/{model}", headers={"x-api-key": key})
        assert resp.status_code == 400, model
        assert resp.json()["error"]["type"] == "invalid_request_error"
    assert upstream.requests == [] and gateway.requests("path") == []

    # Model ids as the SDKs send them reach the upstream exactly as given.
    url = f"{gateway.url}/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert httpx.post(url, headers=gemini, json=body).status_code == 200
    url = f"{gateway.url}/gemini/v1beta/tunedModels/my-tuned_model.1:countTokens"
    assert httpx.post(url, headers=gemini, json=body).status_code == 200
    url = f"{gateway.url}/anthropic/v1/models/claude-sonnet-4-6"
    assert httpx.get(url, headers={"x-api-key": key}).status_code == 200
    seen = [(r.method, r.path, r.query) for r in upstream.wait_for_requests(3)]
    assert seen == [
        ("POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", "alt=sse"),
        ("POST", "/v1beta/tunedModels/my-tuned_model.1:countTokens", ""),
        ("GET", "/v1/models/claude-sonnet-4-6", ""),
    ]
