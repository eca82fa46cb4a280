"""Polar wire shapes for FakePolar: JSON builders with every key polar-sdk 1.0.2's strict loader
requires, Polar's per-event ingest validation, and webhook signing."""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from standardwebhooks import Webhook

COUNT_METER_NAMES = frozenset({"gemini_images", "claude_web_searches"})


def now() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def customer_json(external_id: str | None, email: str, organization_id: str, name: str | None = None) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "created_at": iso(now()),
        "modified_at": None,
        "metadata": {},
        "external_id": external_id,
        "email": email,
        "email_verified": False,
        "type": "individual",
        "name": name,
        "billing_name": None,
        "billing_address": None,
        "tax_id": None,
        "locale": None,
        "organization_id": organization_id,
        "default_payment_method_id": None,
        "deleted_at": None,
        "first_user_event_at": None,
        "avatar_url": None,
    }


def meter_spec(name: str) -> dict[str, Any]:
    count = name in COUNT_METER_NAMES
    return {
        "name": name,
        "unit": "scalar" if count else "token",
        "filter": {"conjunction": "and", "clauses": [{"property": "name", "operator": "eq", "value": name}]},
        "aggregation": {"func": "count"} if count else {"func": "sum", "property": "value"},
    }


def meter_json(spec: Mapping[str, Any], organization_id: str) -> dict[str, Any]:
    return {
        "metadata": dict(spec.get("metadata") or {}),
        "created_at": iso(now()),
        "modified_at": None,
        "id": str(uuid.uuid4()),
        "name": spec["name"],
        "unit": spec.get("unit", "scalar"),
        "custom_label": spec.get("custom_label"),
        "custom_multiplier": spec.get("custom_multiplier"),
        "filter": spec["filter"],
        "aggregation": spec["aggregation"],
        "organization_id": organization_id,
        "archived_at": None,
    }


def state_meter_json(key: str, meter_id: str, credited: int, consumed: float, created: str) -> dict[str, Any]:
    """CustomerStateMeter: credited_units must be a JSON int, consumed/balance floats."""
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, key)),
        "created_at": created,
        "modified_at": None,
        "meter_id": meter_id,
        "consumed_units": float(consumed),
        "credited_units": int(credited),
        "balance": float(credited - consumed),
    }


def subscription_json(
    key: str,
    *,
    status: str,
    period_start: datetime,
    period_end: datetime,
    meters: list[dict[str, Any]],
    created: str,
    cancel_at_period_end: bool = False,
) -> dict[str, Any]:
    """CustomerStateSubscription with every required key (status "active"/"trialing")."""
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, key)),
        "created_at": created,
        "modified_at": None,
        "custom_field_data": {},
        "metadata": {},
        "status": status,
        "amount": 2000,
        "currency": "usd",
        "recurring_interval": "month",
        "current_period_start": iso(period_start),
        "current_period_end": iso(period_end),
        "trial_start": None,
        "trial_end": None,
        "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": None,
        "started_at": iso(period_start),
        "ends_at": None,
        "product_id": str(uuid.uuid5(uuid.NAMESPACE_URL, "product")),
        "discount_id": None,
        "seats": None,
        "units": None,
        "meters": meters,
    }


def subscription_meter_json(key: str, meter_id: str, credited: int, consumed: float, created: str) -> dict[str, Any]:
    return {
        "created_at": created,
        "modified_at": None,
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, key)),
        "consumed_units": float(consumed),
        "credited_units": int(credited),
        "amount": 0,
        "meter_id": meter_id,
    }


def session_json(customer: dict[str, Any], return_url: str | None) -> dict[str, Any]:
    token = f"polar_cst_{secrets.token_urlsafe(24)}"
    return {
        "created_at": iso(now()),
        "modified_at": None,
        "id": str(uuid.uuid4()),
        "token": token,
        "expires_at": iso(now() + timedelta(hours=1)),
        "return_url": return_url,
        "customer_portal_url": f"https://sandbox.polar.sh/org/portal?customer_session_token={token}",
        "customer_id": customer["id"],
        "customer": customer,
    }


def validate_event(i: int, ev: Any) -> list[dict[str, Any]]:
    """Polar's per-event checks (server/polar/event/schemas.py, service.py `ingest`)."""
    loc: list[str | int] = ["body", "events", i]
    if not isinstance(ev, dict):
        return [{"loc": loc, "msg": "Input should be a valid dictionary", "type": "dict_type"}]
    errors: list[dict[str, Any]] = []
    name = ev.get("name")
    if not isinstance(name, str) or not name or len(name) > 128:
        errors.append({"loc": [*loc, "name"], "msg": "Invalid event name", "type": "value_error", "input": name})
    if ("customer_id" in ev) == ("external_customer_id" in ev):
        errors.append({"loc": loc, "msg": "Exactly one customer reference is required", "type": "value_error"})
    ts = ev.get("timestamp")
    if ts is not None:
        try:
            parsed = datetime.fromisoformat(ts) if isinstance(ts, str) else None
        except ValueError:
            parsed = None
        if parsed is None:
            errors.append({"loc": [*loc, "timestamp"], "msg": "Input should be a valid datetime", "type": "datetime"})
        elif parsed.tzinfo is None:
            errors.append(
                {"loc": [*loc, "timestamp"], "msg": "Input should have timezone info", "type": "timezone_aware"}
            )
        elif parsed > now():
            msg = "Value error, Timestamp must be in the past."
            errors.append({"loc": [*loc, "timestamp"], "msg": msg, "type": "value_error", "input": ts})
    metadata = ev.get("metadata", {})
    if not isinstance(metadata, dict):
        return [*errors, {"loc": [*loc, "metadata"], "msg": "Input should be a dictionary", "type": "dict_type"}]
    if len(metadata) > 50:
        errors.append({"loc": [*loc, "metadata"], "msg": "Too many metadata keys", "type": "value_error"})
    for key, value in metadata.items():
        where = [*loc, "metadata", key]
        if len(key) > 40:
            errors.append({"loc": where, "msg": "Key too long", "type": "string_too_long"})
        elif key in ("_llm", "_cost") and isinstance(value, dict):
            continue
        elif isinstance(value, str) and not 1 <= len(value) <= 500:
            msg = "String should have at least 1 character" if not value else "String too long"
            errors.append({"loc": where, "msg": msg, "type": "string_too_short", "input": value})
        elif not isinstance(value, (str, int, float, bool)):
            errors.append({"loc": where, "msg": "Invalid metadata value", "type": "value_error"})
    return errors


def sign_webhook(
    payload: dict[str, Any],
    secret: str,
    *,
    legacy: bool,
    msg_id: str | None = None,
    timestamp: datetime | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a Polar delivery. legacy: key = the full secret's UTF-8 bytes (what the
    server does: base64(secret) fed to standardwebhooks); else Standard Webhooks (whsec_<base64>)."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    msg_id = msg_id or str(uuid.uuid4())
    ts = (timestamp or now()).astimezone(UTC)
    key = base64.b64encode(secret.encode()).decode() if legacy else secret
    signature = Webhook(key).sign(msg_id, ts, body.decode())
    headers = {
        "content-type": "application/json",
        "user-agent": "polar.sh webhooks",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(ts.timestamp())),
        "webhook-signature": signature,
    }
    return body, headers


def webhook_payload(event_type: str, data: dict[str, Any], timestamp: datetime | None = None) -> dict[str, Any]:
    return {"type": event_type, "timestamp": iso(timestamp or now()), "api_version": "2026-10", "data": data}


def new_standard_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
