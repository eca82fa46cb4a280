"""The dashboard's forms (POST): sign in and out, create and revoke keys, re-queue failed events.

Every form but the sign-in needs a valid session and its CSRF token; a request without them
changes nothing.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.admin import revoke_key
from gateway.admin_attempts import TokenCheck, client_address
from gateway.dashboard.auth import (
    FormRefused,
    SessionSigner,
    csrf_matches,
    is_https,
    read_form,
    session_cookie,
    to_signin,
)
from gateway.dashboard.pages import Pages
from gateway.dashboard.render import SECURITY_HEADERS, page
from gateway.keys import USER_ID_RE, InvalidKeyName, InvalidUserId, check_key_name, check_user_id, issue_key
from gateway.services import Services

log = logging.getLogger("gateway.dashboard")


def _see(path: str) -> Response:
    return RedirectResponse(path, 303, headers=SECURITY_HEADERS)


def _refused(message: str, status: int = 403) -> Response:
    return page("message.html", status, nav="", csrf="", title="Refused", message=message)


class Actions:
    def __init__(self, s: Services, signer: SessionSigner, pages: Pages) -> None:
        self.s = s
        self.signer = signer
        self.pages = pages

    async def signin_form(self, request: Request) -> Response:
        if self.signer.session_of(request) is not None:
            return _see("/admin")
        return self._signin_page()

    def _signin_page(self, error: str = "", status: int = 200) -> Response:
        if not self.signer.enabled:
            error, status = "The dashboard is disabled: set GATEWAY_ADMIN_TOKEN.", 503
        return page("signin.html", status, nav="", csrf="", error=error)

    async def signin(self, request: Request) -> Response:
        try:
            form = await read_form(request)
        except FormRefused:
            return self._signin_page("Send the sign-in form.", 400)
        address = client_address(request.client)
        checked = self.s.admin_attempts.check(self.s.settings.admin_token, form.get("token", ""), address)
        if checked.result is TokenCheck.TOO_MANY:
            wait = checked.retry_after
            response = self._signin_page(f"Too many wrong admin tokens: try again in {wait} s.", 429)
            response.headers["retry-after"] = str(wait)
            return response
        if checked.result is not TokenCheck.OK:
            if checked.result is TokenCheck.WRONG:
                log.warning("dashboard sign-in refused from %s", address)
            return self._signin_page("Wrong admin token.", 401)
        response = _see("/admin")
        secure = is_https(request, self.s.settings.secure_cookie)
        response.headers.append("set-cookie", session_cookie(self.signer.issue(), secure=secure))
        return response

    async def _checked_form(self, request: Request) -> dict[str, str] | Response:
        """The form of a state-changing request, or the response refusing it."""
        session = self.signer.session_of(request)
        if session is None:
            return to_signin()
        try:
            form = await read_form(request)
        except FormRefused:
            form = {}  # no CSRF token either
        if not csrf_matches(session, form):
            return _refused("This form is out of date or did not come from the dashboard: reload the page and retry.")
        return form

    async def signout(self, request: Request) -> Response:
        form = await self._checked_form(request)
        if isinstance(form, Response):
            return form
        response = _see("/admin/signin")
        secure = is_https(request, self.s.settings.secure_cookie)
        response.headers.append("set-cookie", session_cookie("", secure=secure, max_age=0))
        return response

    async def create_key(self, request: Request) -> Response:
        form = await self._checked_form(request)
        if isinstance(form, Response):
            return form
        name = form.get("name", "").strip()  # (the rest as the admin API has it)
        try:
            user_id = check_user_id(request.path_params["user_id"])  # before the store: what that raises is a 503
            check_key_name(name)
        except (InvalidUserId, InvalidKeyName) as exc:
            return _refused(str(exc), 400)
        # A key given up on (a 503 page, here or on reading the page that shows it) may be stored all the
        # same: harmless, as its secret was in no answer, so nobody can use it; it is listed and revocable.
        issued = await self.pages.read(issue_key(self.s.store, user_id, name), f"issuing a key for {user_id}")
        # The key is shown in this answer only (never in a URL or a log).
        return await self.pages.user(request, new_key=issued.key, status=201)

    async def revoke_key(self, request: Request) -> Response:
        form = await self._checked_form(request)
        if isinstance(form, Response):
            return form
        user_id, key_id = request.path_params["user_id"], request.path_params["key_id"]
        if not USER_ID_RE.fullmatch(user_id):
            return _refused(f"{user_id} has no key {key_id}.", 404)
        keys = await self.pages.read(self.s.store.list_keys(user_id), f"the keys of {user_id}")
        if all(k.id != key_id for k in keys):
            return _refused(f"{user_id} has no key {key_id}.", 404)
        # refused here at once; other processes through the invalidation log
        await revoke_key(self.s, key_id, "dashboard")
        return _see(f"/admin/users/{user_id}?revoked={key_id}")

    async def requeue(self, request: Request) -> Response:
        form = await self._checked_form(request)
        if isinstance(form, Response):
            return form
        # A re-queue given up on may still be made: the sync loop then finds the events at its next interval.
        n = await self.pages.read(self.s.store.requeue_failed(), "re-queueing failed events")
        if n:
            # wakes the sync loop now, instead of at its next interval
            self.s.recorder.on_events(max(n, self.s.settings.sync_batch_size))
        return _see(f"/admin/sync?requeued={n}")
