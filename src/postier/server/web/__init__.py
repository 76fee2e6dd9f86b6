"""Postier's web interface: server-rendered pages (Jinja2) over the service layer, in French
and English, served by ``postier serve`` beside the API with their own assets (``/static``),
nothing from elsewhere.

:func:`install` adds the pages to the API's application. Pages decide nothing themselves:
they call ``request.app.state.core`` (:class:`postier.core.service.Postier`) and show what it
answers; the only extra code is the queue page's read-only queries (:mod:`.stats`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from postier.errors import PostierError
from postier.i18n import N_, translate
from postier.server.web import (
    account,
    profiles,
    queue,
    settings_bounces,
    settings_pages,
    setup,
    suppressions,
    users,
)
from postier.server.web.context import (
    PageError,
    SignInRequired,
    get_page,
    json_response,
    page_lang,
    redirect,
    render,
    wants_json,
)

STATIC = Path(__file__).parent / "static"
# Paths served by the API, whose errors keep the API's JSON shape.
_API_PREFIXES = ("/api/", "/docs", "/redoc", "/openapi.json")

_ERROR_TITLES = {
    401: N_("Sign in required"),
    403: N_("Access denied"),
    404: N_("Page not found"),
    409: N_("Not possible now"),
    422: N_("Not valid"),
}
_ERROR_TITLE = N_("Something went wrong")


async def _render_error(request: Request, status: int, message: str,
                        hint: str | None) -> Response:
    if wants_json(request):
        return json_response({"error": {"message": message, "hint": hint}}, status)
    p = await get_page(request)
    title = p._(_ERROR_TITLES.get(status, _ERROR_TITLE))
    return render(p, "error.html", status, title=title, message=message, hint=hint,
                  error_status=status)


def install(app: FastAPI) -> None:
    """Mount the pages and their assets on the API's application."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for module in (account, settings_pages, settings_bounces, profiles, queue, users,
                   suppressions, setup):
        app.include_router(module.router)

    async def sign_in_required(request: Request, exc: Exception) -> Response:
        if wants_json(request):
            lang = page_lang(request)
            return await _render_error(request, 401, translate(
                lang, N_("Your session has ended: sign in again.")), None)
        path = request.url.path
        target = path + ("?" + request.url.query if request.url.query else "")
        if request.method != "GET":
            target = path if path in ("/settings", "/profiles", "/users",
                                      "/suppressions") else "/"
        return redirect("/login?next=" + quote(target, safe="/"))

    async def page_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PageError)
        lang = page_lang(request)
        hint = translate(lang, exc.hint, **exc.params) if exc.hint else None
        return await _render_error(request, exc.status,
                                   translate(lang, exc.message, **exc.params), hint)

    api_handler = app.exception_handlers.get(PostierError)

    async def postier_error(request: Request, exc: Exception) -> Response:
        """The API keeps its JSON errors; a page shows the same error as a page."""
        assert isinstance(exc, PostierError)
        if request.url.path.startswith(_API_PREFIXES) and api_handler is not None:
            answer = api_handler(request, exc)
            return await answer if inspect.isawaitable(answer) else answer
        body = exc.render(page_lang(request))
        return await _render_error(request, exc.http_status, body["message"],
                                   body.get("hint"))

    async def http_error(request: Request, exc: Exception) -> Response:
        """An unknown page is a page too (the API keeps FastAPI's JSON)."""
        assert isinstance(exc, StarletteHTTPException)
        if request.url.path.startswith(_API_PREFIXES) or exc.status_code != 404:
            if api_http is not None and request.url.path.startswith("/api/"):
                answer = api_http(request, exc)
                return await answer if inspect.isawaitable(answer) else answer
            return await http_exception_handler(request, exc)
        lang = page_lang(request)
        return await _render_error(request, 404, translate(
            lang, N_("There is no page at this address.")), None)

    api_validation = app.exception_handlers.get(RequestValidationError)
    api_http = app.exception_handlers.get(StarletteHTTPException)

    async def bad_address(request: Request, exc: Exception) -> Response:
        """A page address with a malformed part (/profiles/abc) is no page."""
        if request.url.path.startswith(_API_PREFIXES) and api_validation is not None:
            answer = api_validation(request, exc)
            return await answer if inspect.isawaitable(answer) else answer
        lang = page_lang(request)
        return await _render_error(request, 404, translate(
            lang, N_("There is no page at this address.")), None)

    app.add_exception_handler(RequestValidationError, bad_address)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(SignInRequired, sign_in_required)
    app.add_exception_handler(PageError, page_error)
    app.add_exception_handler(PostierError, postier_error)
