"""The console's HTTP side: routes, the login and CSRF checks around every page, error pages.

Every page reads and changes the control plane through the same :class:`ControlPlane` methods and
:class:`Handlers` checks as the JSON API (one copy of each rule); this module only turns forms into
calls and results into HTML.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import quote, urlsplit

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_request import FileField
from multidict import MultiDictProxy

from agent.controlplane.console import pages, render
from agent.controlplane.console.security import HOME, ConsoleRefusal, add_headers, is_console_path, safe_next, see_other
from agent.controlplane.console.session import COOKIE, LOGIN_COOKIE, SESSION_LABEL, SESSION_SECONDS, Session, Sessions
from agent.controlplane.console.session import same_token as _same_token
from agent.controlplane.console.wizard_pages import add_wizard_pages
from agent.controlplane.core import ApiFailure, ts
from agent.controlplane.routes import Handlers
from agent.controlplane.store import RowDamaged, StoreUnavailable
from agent.protocol.errors import Code

log = structlog.get_logger("controlplane.console")

#: The form field and the header (htmx requests) that carry the CSRF token.
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"

Page = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]

#: What ``/console/static/`` serves: these files only, read once from the package.
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png"}


class Console:
    """The web console of one control plane. :meth:`add_routes` mounts it; :attr:`middleware` wraps it."""

    def __init__(self, handlers: Handlers) -> None:
        self.handlers = handlers
        self.cp = handlers.cp
        self.sessions = Sessions(lambda: handlers.derived_keys(SESSION_LABEL), handlers.cp.now)
        self._static = _load_static()

    # --- mounting ------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self.root, name="console_root")
        r.add_get("/console", self.root, name="console_index_bare")
        r.add_get("/console/", self.root, name="console_index")
        r.add_get("/console/login", self.login_form, name="console_login_form")
        r.add_post("/console/login", self.login, name="console_login")
        r.add_post("/console/logout", self.guard(self.logout, post=True), name="console_logout")
        r.add_get("/console/static/{name}", self.static, name="console_static")
        add_wizard_pages(self, app)  # first: /console/connectors/new is the wizard, not a connector
        pages.add_pages(self, app)

    @property
    def middleware(self) -> Middleware:
        """Security headers on every console response, and HTML (not JSON) for its errors."""

        @web.middleware
        async def console_pages(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if not is_console_path(request.path):
                return await handler(request)
            try:
                response = await handler(request)
            except ConsoleRefusal as exc:
                response = self.error_page(request, exc.status, exc.title, exc.message)
            except ApiFailure as exc:
                title = "Not found" if exc.status == 404 else "Refused"
                response = self.error_page(request, exc.status, title, exc.message)
            except StoreUnavailable as exc:
                response = self.error_page(
                    request, 503, "Unavailable", f"The control plane cannot answer now ({exc}); nothing was changed."
                )
                response.headers["Retry-After"] = "5"
            except RowDamaged as exc:
                log.error("controlplane.console.row_damaged", path=request.path, error=str(exc))
                response = self.error_page(request, 500, "Damaged record", f"{exc}; see the control plane's log.")
            except web.HTTPNotFound:
                response = self.error_page(request, 404, "Not found", f"There is no console page at {request.path}.")
            except web.HTTPMethodNotAllowed as exc:
                response = self.error_page(request, 405, "Not allowed", f"{request.method} is not allowed here.")
                response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
            except web.HTTPException as exc:
                response = self.error_page(request, exc.status, "Refused", exc.reason)
            except Exception:
                # A bug: logged with its traceback, and still a console page with the console's headers
                # (the JSON error middleware outside would answer without them).
                log.exception("controlplane.console.internal_error", method=request.method, path=request.path)
                response = self.error_page(
                    request, 500, "Internal error", "The console failed to answer; see the control plane's log."
                )
            if response.status >= 400 and request.headers.get("HX-Request"):
                # An htmx request that failed (a row's connector deleted meanwhile, a store fault): its
                # error page takes the place of the page's <main>, rather than nothing happening.
                response.headers.update({"HX-Retarget": "main", "HX-Reselect": "main", "HX-Reswap": "outerHTML"})
            add_headers(response)
            return response

        return console_pages

    # --- the guard around pages -------------------------------------------------------------------

    def guard(self, page: Page, *, post: bool = False) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Require a session (else go to the login page), and on POST the session's CSRF token."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            session = self.sessions.check(request.cookies.get(COOKIE))
            if session is None:
                login = "/console/login"
                # Back to the page the person was on: for htmx (a row's refresh) the page, not the fragment.
                if request.headers.get("HX-Request"):
                    target = request.headers.get("HX-Current-URL")
                else:
                    target = request.path_qs if request.method == "GET" else None
                if request.method == "GET" or target:
                    login += "?next=" + quote(safe_next(_path_of(target)), safe="/")
                if request.headers.get("HX-Request"):
                    # htmx would swap the login page into a row: tell it to load the page instead.
                    return web.Response(status=401, headers={"HX-Redirect": login})
                return see_other(login)
            if post:
                form = await read_form(request)
                given = request.headers.get(CSRF_HEADER) or _text(form.get(CSRF_FIELD))
                if not _same_token(session.csrf, given):
                    log.warning("controlplane.console.csrf_refused", path=request.path, token_given=bool(given))
                    raise ConsoleRefusal(
                        403,
                        "Refused: missing or wrong security token",
                        "This form did not carry this session's security (CSRF) token, so nothing was changed. "
                        "Reload the page and try again.",
                    )
            return await page(request, session)

        return guarded

    # --- pages of the session itself ------------------------------------------------------------

    async def root(self, request: web.Request) -> web.StreamResponse:
        return see_other(HOME)

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if self.sessions.check(request.cookies.get(COOKIE)) is not None:
            return see_other(safe_next(request.query.get("next")))
        return self._login_page(request, next_=safe_next(request.query.get("next")))

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await read_form(request)
        next_ = safe_next(_text(form.get("next")))
        pre = request.cookies.get(LOGIN_COOKIE)
        if pre is None or not _same_token(pre, _text(form.get(CSRF_FIELD))):
            raise ConsoleRefusal(
                403,
                "Refused: missing or wrong security token",
                "The login form's security token did not match (cookies off, or a form from elsewhere). "
                "Open the login page again.",
            )
        address = request.remote or "unknown"
        failures = self.handlers.failures
        wait = failures.retry_after(address)
        if wait is not None:
            self.cp.metrics.auth_refused("api_key", Code.RATE_LIMITED)
            page = self._login_page(
                request,
                next_=next_,
                status=429,
                error=f"Too many failed logins from {address}: try again in {int(wait + 0.999)} s.",
            )
            page.headers["Retry-After"] = str(int(wait + 0.999))
            return page
        key = _text(form.get("api_key")) or ""
        index = self.handlers.api_key_index(key.strip()) if key.strip() else None
        if index is None:
            self.cp.metrics.auth_refused("api_key", Code.UNAUTHENTICATED)
            failures.failed(address)
            log.warning("controlplane.console.login_refused", address=address)
            error = "Enter the control plane's API key." if not key.strip() else "Wrong API key."
            return self._login_page(request, next_=next_, status=401, error=error)
        _, cookie = self.sessions.issue(index)
        log.info("controlplane.console.login", address=address)
        response = see_other(next_)
        response.set_cookie(
            COOKIE,
            cookie,
            max_age=int(SESSION_SECONDS),
            path="/console",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        response.del_cookie(LOGIN_COOKIE, path="/console/login")
        return response

    async def logout(self, request: web.Request, session: Session) -> web.StreamResponse:
        self.sessions.end(session)
        response = see_other("/console/login")
        response.del_cookie(COOKIE, path="/console")
        return response

    def _login_page(
        self, request: web.Request, *, next_: str, status: int = 200, error: str | None = None
    ) -> web.Response:
        token = secrets.token_urlsafe(24)
        response = self.html(
            "login.html", None, status=status, title="Log in", next=next_, login_csrf=token, error=error
        )
        response.set_cookie(
            LOGIN_COOKIE, token, path="/console/login", httponly=True, samesite="Strict", secure=request.secure
        )
        return response

    async def static(self, request: web.Request) -> web.StreamResponse:
        found = self._static.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        body, content_type = found
        return web.Response(body=body, content_type=content_type)

    # --- rendering ---------------------------------------------------------------------------------

    def html(self, template: str, session: Session | None, *, status: int = 200, **context: Any) -> web.Response:
        """A page (or a fragment) with the session's CSRF token at hand for its forms."""
        context.setdefault("nav", "")
        text = render.render(template, csrf=session.csrf if session else "", logged_in=session is not None, **context)
        return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")

    def error_page(self, request: web.Request, status: int, title: str, message: str) -> web.Response:
        session = self.sessions.check(request.cookies.get(COOKIE))
        return self.html("error.html", session, status=status, title=title, message=message)

    def now(self) -> Any:
        """The control plane's clock as the records' timestamps are made (a test's clock when it has one)."""
        return ts(self.cp.now())


def _load_static() -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    for item in resources.files("agent.controlplane.console").joinpath("static").iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in STATIC_TYPES:
            files[item.name] = (item.read_bytes(), STATIC_TYPES[suffix])
    return files


async def read_form(request: web.Request) -> MultiDictProxy[str | bytes | bytearray | FileField]:
    """The posted form; one that cannot be read (an unknown charset, bytes that are not UTF-8, a
    broken multipart body) is the sender's mistake: a 400 page, not an internal error."""
    try:
        return await request.post()
    except (ValueError, LookupError, AssertionError) as exc:
        raise ConsoleRefusal(
            400,
            "Unreadable form",
            f"The form could not be read ({type(exc).__name__}); nothing was changed. Reload the page and try again.",
        ) from None


def _text(value: object) -> str | None:
    """A form field as text (a file upload where text belongs counts as absent)."""
    return value if isinstance(value, str) else None


def _path_of(url: str | None) -> str | None:
    """The path and query of an absolute URL (htmx says where the page is), for ``next``."""
    if not url:
        return None
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")
