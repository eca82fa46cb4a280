"""Admin HTTP API for key provisioning, guarded by `Authorization: Bearer $GATEWAY_ADMIN_TOKEN`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin_attempts import TokenCheck, client_address
from gateway.http_api import BodyRefused, StoreUnavailable, api_error, from_store, read_json
from gateway.keys import USER_ID_RE, InvalidKeyName, InvalidUserId, check_key_name, check_user_id, issue_key
from gateway.services import Services
from gateway.store.base import ApiKey
from gateway.timeutil import iso

Endpoint = Callable[[Request], Awaitable[Response]]


def key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "user_id": key.user_id,
        "name": key.name,
        "prefix": key.prefix,
        "created_at": iso(key.created_at),
        "revoked_at": iso(key.revoked_at) if key.revoked_at else None,
    }


def guarded(s: Services, endpoint: Endpoint) -> Endpoint:
    async def wrapper(request: Request) -> Response:
        token = s.settings.admin_token
        if not token:
            return api_error(503, "the admin API is disabled: set GATEWAY_ADMIN_TOKEN")
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        checked = s.admin_attempts.check(token, given, client_address(request.client))
        if checked.result is TokenCheck.TOO_MANY:
            headers = {"retry-after": str(checked.retry_after)}
            return api_error(429, "too many wrong admin tokens from this address", headers)
        if checked.result is not TokenCheck.OK:
            return api_error(401, "admin token required")
        try:
            return await endpoint(request)
        except StoreUnavailable as exc:  # (logged where the call was given up on)
            return exc.response

    return wrapper


async def revoke_key(s: Services, key_id: str, who: str) -> bool:
    """Revoke `key_id` (False: no such active key) within the store timeout; StoreUnavailable if the
    store does not revoke it in time."""
    wait = s.settings.store_timeout_seconds

    def late(revoked: bool) -> None:
        # Revoked after the 503 after all (a retry finds no active key): refused here at once all the
        # same; other processes stop taking it when their key cache expires (1 s).
        if revoked:
            s.keys.evict_key_id(key_id)

    if not await from_store(s.store.revoke_key(key_id), wait, f"{who}: revoking {key_id}", late):
        return False
    try:
        await from_store(s.key_revoked(key_id), wait, f"{who}: revoked {key_id}, but could not tell other processes")
    except StoreUnavailable:
        # The key is revoked and refused here already (`key_revoked` evicts before it notifies); other
        # processes miss only the early notice and stop taking it when their key cache expires (1 s).
        pass
    return True


def admin_routes(s: Services) -> list[Route]:
    wait = s.settings.store_timeout_seconds

    async def create(request: Request) -> Response:
        try:
            data = await read_json(request)
        except BodyRefused as exc:
            return exc.response
        if not isinstance(data, dict) or not isinstance(data.get("user_id"), str):
            return api_error(400, 'body must be {"user_id": "...", "name": "..."}')
        name = data.get("name", "")
        if not isinstance(name, str):
            return api_error(400, "name must be a string")
        try:
            user_id = check_user_id(data["user_id"])  # before the store call: what that raises is a 503
            check_key_name(name)
        except (InvalidUserId, InvalidKeyName) as exc:
            return api_error(400, str(exc))
        # A key given up on may still be stored after the 503: harmless, as its secret was in no answer
        # (only its hash is stored), so nobody can use it; it is listed, and can be revoked, like any other.
        issued = await from_store(issue_key(s.store, user_id, name), wait, f"admin API: issuing a key for {user_id}")
        return JSONResponse({**key_json(issued.record), "key": issued.key}, 201)

    async def list_keys(request: Request) -> Response:
        user_id = request.query_params.get("user_id")
        if user_id is not None and not USER_ID_RE.fullmatch(user_id):
            return JSONResponse({"data": []})  # no key has such a user id (and PostgreSQL refuses NUL)
        keys = await from_store(s.store.list_keys(user_id), wait, "admin API: listing keys")
        return JSONResponse({"data": [key_json(k) for k in keys]})

    async def revoke(request: Request) -> Response:
        key_id = request.path_params["key_id"]
        if "\x00" in key_id or not await revoke_key(s, key_id, "admin API"):
            return api_error(404, f"no active key {key_id}")
        return JSONResponse({"id": key_id, "revoked": True})

    async def keys(request: Request) -> Response:
        # One route for both methods, so a 405 lists both in its Allow header.
        return await (create if request.method == "POST" else list_keys)(request)

    return [
        Route("/admin/keys", guarded(s, keys), methods=["GET", "POST"]),
        Route("/admin/keys/{key_id}", guarded(s, revoke), methods=["DELETE"]),
    ]
