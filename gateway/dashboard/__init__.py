"""The admin dashboard (`/admin`): server-rendered pages behind a session signed in with the admin token."""

from __future__ import annotations

from starlette.routing import Route

from gateway.dashboard.actions import Actions
from gateway.dashboard.auth import Endpoint, SessionSigner
from gateway.dashboard.pages import Pages, unavailable_page
from gateway.dashboard.polar_state import PolarProbe
from gateway.services import Services

__all__ = ["SessionSigner", "dashboard_routes"]


def dashboard_routes(s: Services) -> list[Route]:
    signer = SessionSigner(s.settings.admin_token)
    pages = Pages(s, signer, PolarProbe(s.polar, s.settings.polar_environment))
    actions = Actions(s, signer, pages)

    # The pages and forms that use the store answer a 503 page when it does not answer in time.
    def guarded(endpoint: Endpoint) -> Endpoint:
        return unavailable_page(signer.guard(endpoint))

    return [
        Route("/admin", guarded(pages.overview), methods=["GET"]),
        Route("/admin/signin", actions.signin_form, methods=["GET"]),
        Route("/admin/signin", actions.signin, methods=["POST"]),
        Route("/admin/signout", actions.signout, methods=["POST"]),
        Route("/admin/users", guarded(pages.users), methods=["GET"]),
        Route("/admin/users/{user_id}", guarded(pages.user), methods=["GET"]),
        Route("/admin/users/{user_id}/keys", unavailable_page(actions.create_key), methods=["POST"]),
        Route("/admin/users/{user_id}/keys/{key_id}/revoke", unavailable_page(actions.revoke_key), methods=["POST"]),
        Route("/admin/sync", guarded(pages.sync), methods=["GET"]),
        Route("/admin/sync/requeue", unavailable_page(actions.requeue), methods=["POST"]),
    ]
