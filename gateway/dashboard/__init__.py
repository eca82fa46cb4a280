"""The admin dashboard (`/admin`): server-rendered pages behind a session signed in with the admin token."""

from __future__ import annotations

from starlette.routing import Route

from gateway.dashboard.actions import Actions
from gateway.dashboard.auth import SessionSigner
from gateway.dashboard.pages import Pages
from gateway.dashboard.polar_state import PolarProbe
from gateway.services import Services

__all__ = ["SessionSigner", "dashboard_routes"]


def dashboard_routes(s: Services) -> list[Route]:
    signer = SessionSigner(s.settings.admin_token)
    pages = Pages(s, signer, PolarProbe(s.polar, s.settings.polar_environment))
    actions = Actions(s, signer, pages)
    guard = signer.guard
    return [
        Route("/admin", guard(pages.overview), methods=["GET"]),
        Route("/admin/signin", actions.signin_form, methods=["GET"]),
        Route("/admin/signin", actions.signin, methods=["POST"]),
        Route("/admin/signout", actions.signout, methods=["POST"]),
        Route("/admin/users", guard(pages.users), methods=["GET"]),
        Route("/admin/users/{user_id}", guard(pages.user), methods=["GET"]),
        Route("/admin/users/{user_id}/keys", actions.create_key, methods=["POST"]),
        Route("/admin/users/{user_id}/keys/{key_id}/revoke", actions.revoke_key, methods=["POST"]),
        Route("/admin/sync", guard(pages.sync), methods=["GET"]),
        Route("/admin/sync/requeue", actions.requeue, methods=["POST"]),
    ]
