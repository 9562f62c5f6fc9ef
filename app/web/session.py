"""Browser sessions: the API key in an HttpOnly, SameSite=Strict cookie, CSRF tokens bound to it, and the
route class that turns the service's errors into HTML pages (a missing login into a redirect)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from crosspatch.app import auth, deps
from crosspatch.app.deps import ReadSessionDep
from crosspatch.app.errors import AppError, Forbidden
from crosspatch.app.store.models import Job, User

SESSION_COOKIE = "crosspatch_session"  # holds the API key itself: HttpOnly, SameSite=Strict
LOGIN_COOKIE = "crosspatch_login"  # a random token the login form echoes (login CSRF)
CSRF_FIELD = "csrf_token"
MAX_FORM_BYTES = 1_000_000


class LoginRequired(Exception):
    """No valid session cookie: the page answers with a redirect to the login form."""


def csrf_token(key: str) -> str:
    """The CSRF token of the session holding `key`: an HMAC keyed by the secret key, so only a page the
    session itself loaded can know it (no server-side state; a new key means new tokens)."""
    return hmac.new(key.encode(), b"crosspatch-dashboard-csrf", hashlib.sha256).hexdigest()


def new_login_token() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Viewer:
    """The logged-in user of a page and the CSRF token their forms carry."""

    user: User
    csrf: str

    @property
    def is_admin(self) -> bool:
        return self.user.role == "admin"


def get_viewer(request: Request, session: ReadSessionDep) -> Viewer:
    """The user whose API key the session cookie holds (the same check as the API's `Authorization`)."""
    key = request.cookies.get(SESSION_COOKIE)
    user = auth.authenticate(session, key) if key else None
    if user is None:
        raise LoginRequired
    return Viewer(user=user, csrf=csrf_token(key))  # type: ignore[arg-type]


ViewerDep = Annotated[Viewer, Depends(get_viewer)]


def get_admin_viewer(viewer: ViewerDep) -> Viewer:
    deps.get_admin(viewer.user)  # the API's role check: 403 for researchers
    return viewer


AdminViewer = Annotated[Viewer, Depends(get_admin_viewer)]


def get_readable_job(job_id: uuid.UUID, session: ReadSessionDep, viewer: ViewerDep) -> Job:
    """A job the viewer may read, by the API's own rule (`deps.get_job`: lab-shared, own, or admin)."""
    return deps.get_job(job_id, session, viewer.user)


WebJob = Annotated[Job, Depends(get_readable_job)]


async def form_fields(request: Request) -> dict[str, str]:
    """An `application/x-www-form-urlencoded` body as {name: last value} (the dashboard's forms only)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise Forbidden("form too large")
    parsed = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {k: v[-1] for k, v in parsed.items()}


FormDep = Annotated[dict[str, str], Depends(form_fields)]


def check_csrf(viewer: Viewer, form: dict[str, str]) -> None:
    """Refuse (403) a form whose hidden CSRF token is missing or not this session's."""
    if not hmac.compare_digest(form.get(CSRF_FIELD, ""), viewer.csrf):
        raise Forbidden("this form's CSRF token is missing or wrong; reload the page and try again")


def set_session(response: Response, request: Request, key: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        key,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def clear_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")


ErrorPage = Callable[[Request, int, str], HTMLResponse]
_error_page: list[ErrorPage] = []


def on_error(render: ErrorPage) -> ErrorPage:
    """Register the function that renders an error page (the router's templates)."""
    _error_page[:] = [render]
    return render


class WebRoute(APIRoute):
    """An API route whose errors are pages: 401 -> the login form, other errors -> an HTML error page."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/ui/login?next={quote(target)}", status_code=303)
            except AppError as e:
                return _error_page[0](request, e.status, e.message)
            except RequestValidationError as e:
                msg = "; ".join(f"{'.'.join(map(str, x.get('loc', ())))}: {x.get('msg')}" for x in e.errors())
                return _error_page[0](request, 422, msg or "invalid request")
            except StarletteHTTPException as e:
                return _error_page[0](request, e.status_code, str(e.detail))

        return route
