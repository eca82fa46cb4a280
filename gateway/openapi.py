"""The OpenAPI 3 document of the gateway's own API, served at `/openapi.json`.

It covers the admin, billing, status-token, webhook and health routes. The provider routes
(`/anthropic/...`, `/gemini/...`) are the providers' own APIs passed through, so they are not here.
Written by hand: it is the contract, and every error in it has the one shape of `gateway/http_api.py`.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.keys import KEY_NAME_MAX, KEY_NAME_PATTERN, USER_ID_RE
from gateway.status_tokens import DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS, MIN_TTL_SECONDS

_USER_ID = {
    "type": "string",
    "pattern": USER_ID_RE.pattern,
    "minLength": 1,
    "maxLength": 128,
    "not": {"enum": [".", ".."]},  # refused by check_user_id (path segments)
}
_TIME = {"type": "string", "format": "date-time"}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_NULLABLE_INT = {"type": ["integer", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "The request is invalid; the message says how",
        401: "Missing or invalid credentials",
        403: "Forbidden",
        404: "Not found",
        405: "Method not allowed",
        413: "The body is too large",
        429: "Too many wrong admin tokens from this address; `Retry-After` says when to try again",
        500: "Internal error",
        503: "The feature is not configured, or a dependency is unavailable",
    }
    return {str(s): _json(_ref("Error"), text[s]) for s in statuses}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]
_BILLING: list[dict[str, list[str]]] = [{"gatewayKey": []}, {"gatewayKeyHeader": []}, {"statusToken": []}]

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    },
    "Key": {
        "type": "object",
        "required": ["id", "user_id", "name", "prefix", "created_at", "revoked_at"],
        "properties": {
            "id": {"type": "string"},
            "user_id": _USER_ID,
            "name": {"type": "string"},
            "prefix": {"type": "string", "description": "The key's first characters, to recognise it"},
            "created_at": _TIME,
            "revoked_at": _NULLABLE_TIME,
        },
    },
    "MeterStatus": {
        "type": "object",
        "required": ["name", "consumed", "reserved", "credited", "remaining", "percentUsed", "status"],
        "properties": {
            "name": {"type": "string"},
            "consumed": {"type": "integer"},
            "reserved": {"type": "integer", "description": "Held by requests in flight"},
            "credited": {**_NULLABLE_INT, "description": "Allowance this period; null = unlimited (not metered)"},
            "remaining": _NULLABLE_INT,
            "percentUsed": {"type": ["number", "null"]},
            "status": _ref("Status"),
        },
    },
    "Status": {"type": "string", "enum": ["ok", "warning", "critical", "exceeded"]},
    "BillingStatus": {
        "type": "object",
        "required": ["userId", "status", "meters", "period", "limits"],
        "properties": {
            "userId": _USER_ID,
            "status": _ref("Status"),
            "meters": {"type": "array", "items": _ref("MeterStatus")},
            "period": {
                "type": "object",
                "required": ["start", "end"],
                "properties": {"start": _TIME, "end": _TIME},
            },
            "limits": {
                "type": "object",
                "required": ["source", "updatedAt"],
                "properties": {"source": {"type": "string", "enum": ["polar", "plan"]}, "updatedAt": _NULLABLE_TIME},
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "unstored", "sync"],
        "properties": {
            "status": {"type": "string", "enum": ["ok"]},
            "unstored": {"type": "integer", "description": "Finished requests the store has not taken yet"},
            "sync": {
                "type": "object",
                "required": ["pending", "failed", "oldest_pending_age_seconds", "polar_ok"],
                "properties": {
                    "pending": {**_NULLABLE_INT, "description": "Requests not yet in Polar; null if the store is down"},
                    "failed": {**_NULLABLE_INT, "description": "Requests Polar rejected (parked)"},
                    "oldest_pending_age_seconds": {"type": ["number", "null"]},
                    "polar_ok": {
                        "type": ["boolean", "null"],
                        "description": "Whether the last call to Polar worked; null if Polar is not configured"
                        " or not called yet",
                    },
                },
            },
        },
    },
}

_PATHS: dict[str, Any] = {
    "/healthz": {
        "get": {
            "summary": "Liveness and the Polar sync backlog",
            "security": [],
            "responses": {"200": _json(_ref("Health"), "The gateway serves")},
        }
    },
    "/admin/keys": {
        "post": {
            "summary": "Issue a gateway key (shown once)",
            "security": _ADMIN,
            "requestBody": _body(
                {
                    "type": "object",
                    "required": ["user_id"],
                    "properties": {
                        "user_id": _USER_ID,
                        "name": {
                            "type": "string",
                            "maxLength": KEY_NAME_MAX,
                            "pattern": KEY_NAME_PATTERN,
                            "description": "A label; no control characters",
                        },
                    },
                }
            ),
            "responses": {
                "201": _json(
                    {
                        "allOf": [
                            _ref("Key"),
                            {"type": "object", "required": ["key"], "properties": {"key": {"type": "string"}}},
                        ]
                    },
                    "The key; `key` is the secret, never shown again",
                ),
                **_errors(400, 401, 413, 503),
            },
        },
        "get": {
            "summary": "List keys",
            "security": _ADMIN,
            "parameters": [{"name": "user_id", "in": "query", "required": False, "schema": {"type": "string"}}],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["data"],
                        "properties": {"data": {"type": "array", "items": _ref("Key")}},
                    },
                    "Keys, oldest first",
                ),
                **_errors(401, 503),
            },
        },
    },
    "/admin/keys/{key_id}": {
        "delete": {
            "summary": "Revoke a key",
            "security": _ADMIN,
            "parameters": [{"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["id", "revoked"],
                        "properties": {"id": {"type": "string"}, "revoked": {"type": "boolean"}},
                    },
                    "Revoked",
                ),
                **_errors(401, 404, 503),
            },
        }
    },
    "/admin/status-tokens": {
        "post": {
            "summary": "Issue a short-lived, read-only status token for a user",
            "description": "Signed, not stored. Only /api/billing/status and /api/billing/portal accept it.",
            "security": _ADMIN,
            "requestBody": _body(
                {
                    "type": "object",
                    "required": ["user_id"],
                    "properties": {
                        "user_id": _USER_ID,
                        "ttl_seconds": {
                            "type": "integer",
                            "minimum": MIN_TTL_SECONDS,
                            "maximum": MAX_TTL_SECONDS,
                            "default": DEFAULT_TTL_SECONDS,
                        },
                    },
                }
            ),
            "responses": {
                "201": _json(
                    {
                        "type": "object",
                        "required": ["token", "user_id", "expires_at"],
                        "properties": {"token": {"type": "string"}, "user_id": _USER_ID, "expires_at": _TIME},
                    },
                    "The token",
                ),
                **_errors(400, 401, 413, 503),
            },
        }
    },
    "/admin/healthbar-demo": {
        "get": {
            "summary": "A page showing the healthbar widget for one user",
            "security": _ADMIN,
            "parameters": [
                {"name": "user_id", "in": "query", "required": True, "schema": _USER_ID},
                {
                    "name": "ttl_seconds",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": MIN_TTL_SECONDS, "maximum": MAX_TTL_SECONDS},
                },
                {
                    "name": "refresh",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 3600},
                },
            ],
            "responses": {
                "200": {"description": "The page", "content": {"text/html": {"schema": {"type": "string"}}}},
                **_errors(400, 401, 503),
            },
        }
    },
    "/api/billing/status": {
        "get": {
            "summary": "The caller's quota this period",
            "security": _BILLING,
            "responses": {"200": _json(_ref("BillingStatus"), "Usage and limits per meter"), **_errors(401, 503)},
        }
    },
    "/api/billing/portal": {
        "get": {
            "summary": "A link to the caller's Polar customer portal",
            "security": _BILLING,
            "parameters": [
                {"name": "return_url", "in": "query", "required": False, "schema": {"type": "string", "format": "uri"}}
            ],
            "responses": {
                "200": _json(
                    {"type": "object", "required": ["url"], "properties": {"url": {"type": "string", "format": "uri"}}},
                    "The portal URL (short-lived)",
                ),
                **_errors(400, 401, 404, 503),
                "429": _json(
                    _ref("Error"),
                    "Too many portal sessions for this user this minute; `Retry-After` says when to try again",
                ),
            },
        }
    },
    "/webhooks/polar": {
        "post": {
            "summary": "Polar webhooks (Standard Webhooks signature)",
            "security": [],
            "parameters": [
                {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
                for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
            ],
            "requestBody": _body({"type": "object"}),
            "responses": {
                "200": _json(
                    {"type": "object", "properties": {"status": {"type": "string"}}}, "Processed or duplicate"
                ),
                "202": _json({"type": "object", "properties": {"status": {"type": "string"}}}, "Ignored event type"),
                **_errors(400, 403, 413, 500, 503),
            },
        }
    },
    "/static/healthbar.js": {
        "get": {
            "summary": "The <gateway-healthbar> web component",
            "security": [],
            "responses": {
                "200": {
                    "description": "JavaScript module",
                    "content": {"text/javascript": {"schema": {"type": "string"}}},
                },
                "304": {"description": "Not modified (ETag)"},
            },
        }
    },
}

# Every admin operation may be refused for the address's wrong tokens (gateway.admin_attempts).
for _ops in _PATHS.values():
    for _op in _ops.values():
        if _op.get("security") is _ADMIN:
            _op["responses"].update(_errors(429))

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "polar-gateway",
        "version": "1",
        "description": 'The gateway\'s own API. Every error is {"error": {"type", "message"}}.',
    },
    "paths": _PATHS,
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {
            "adminToken": {"type": "http", "scheme": "bearer", "description": "GATEWAY_ADMIN_TOKEN"},
            "gatewayKey": {"type": "http", "scheme": "bearer", "description": "A user's gateway key (pgw_...)"},
            "gatewayKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            "statusToken": {"type": "http", "scheme": "bearer", "description": "A status token (pgs_...)"},
        },
    },
}


def openapi_route() -> Route:
    async def openapi(request: Request) -> Response:
        return JSONResponse(DOCUMENT)

    return Route("/openapi.json", openapi, methods=["GET"])
