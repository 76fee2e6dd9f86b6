"""The FastAPI application: error handling, routers, lifespan of the installation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from postier import __version__
from postier.core.pace import PaceExceeded
from postier.core.service import Postier
from postier.errors import PostierError, StoreUnavailable
from postier.i18n import N_, negotiate, translate
from postier.server import web
from postier.server.api import (
    admin,
    alerts,
    bounces,
    dkim,
    messages,
    operations,
    profiles,
    senders,
    users,
)
from postier.server.api.guard import RequestGuard
from postier.store.sql_base import database_unreachable, unreachable

# Seconds a client is asked to wait when the store cannot answer (a database restart).
STORE_RETRY_AFTER = "5"


def _lang(request: Request) -> str:
    return negotiate(request.headers.get("accept-language"))


def _field(loc: tuple[Any, ...], kind: str = "") -> str:
    if kind == "json_invalid":
        return "body"  # the position pydantic gives is a character offset, not a field
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


async def postier_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PostierError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    if isinstance(exc, PaceExceeded):
        headers = {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, StoreUnavailable) and exc.http_status == 503:
        headers = {"Retry-After": STORE_RETRY_AFTER}
    return JSONResponse(
        {"error": exc.render(_lang(request))}, status_code=exc.http_status, headers=headers
    )


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """An error no handler knows. The database out of reach (however the driver said it)
    is a 503 "try again later", answered like any StoreUnavailable (the web pages turn it
    into an error page); anything else a 500 that shows no internal text. The exception
    itself goes to the log (the server re-raises it after this answer)."""
    if unreachable(exc):
        handler = request.app.exception_handlers.get(PostierError, postier_error)
        answer: Response = await handler(request, database_unreachable())
        return answer
    return JSONResponse({"error": PostierError().render(_lang(request))}, status_code=500)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    lang = _lang(request)
    problems = []
    for err in exc.errors():
        field = _field(tuple(err.get("loc", ())), str(err.get("type", "")))
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, PostierError):
            body = cause.render(lang)
            body["field"] = field
        else:
            text = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            body = {
                "code": "invalid",
                "field": field,
                "message": translate(lang, N_("{field}: {problem}"), field=field, problem=text),
            }
        problems.append(body)
    first: dict[str, Any] = dict(problems[0]) if problems else {"code": "invalid"}
    first["problems"] = problems
    return JSONResponse({"error": first}, status_code=422)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own errors (a body that is not JSON, an unknown path, a wrong method) in
    the API's error shape and the caller's language."""
    assert isinstance(exc, StarletteHTTPException)
    lang = _lang(request)
    messages = {
        400: N_("The request body cannot be read: send JSON (Content-Type: "
                "application/json)."),
        404: N_("There is nothing at this address."),
        405: N_("This address does not accept this method."),
    }
    template = messages.get(exc.status_code)
    message = translate(lang, template) if template else str(exc.detail)
    return JSONResponse({"error": {"code": "invalid" if exc.status_code == 400 else
                                   "not_found" if exc.status_code == 404 else "http",
                                   "message": message}},
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


# Swagger UI's and ReDoc's files as the fastapi-offline package ships them: /docs and
# /redoc load nothing from another site.
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"


def _install_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` on assets served by this server."""
    app.mount("/docs/assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    title = f"{app.title} API"

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title=title,
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json", title=title,
            redoc_js_url="/docs/assets/redoc.standalone.js",
            redoc_favicon_url="/docs/assets/favicon.png", with_google_fonts=False,
        )


def create_app(
    core: Postier,
    *,
    on_startup: Callable[[], Any] | None = None,
    on_shutdown: Callable[[], Any] | None = None,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(
        title="Postier",
        version=__version__,
        description="Outgoing e-mail for school software: a durable queue, the "
        "establishment's sender policy, delivery through its SMTP relay.",
        lifespan=lifespan,
        docs_url=None,  # served by _install_docs, from this server's own files
        redoc_url=None,
    )
    app.state.core = core
    app.add_middleware(RequestGuard, core=core, limit=core.config.request_size_limit())
    app.add_exception_handler(PostierError, postier_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
    _install_docs(app)

    app.include_router(messages.router)
    app.include_router(admin.router)
    app.include_router(admin.presets_router)
    app.include_router(profiles.router)
    app.include_router(users.router)
    app.include_router(dkim.router)
    app.include_router(admin.domains_router)
    app.include_router(senders.router)  # sender address verification
    app.include_router(operations.router)  # readiness, metrics, personal data
    app.include_router(alerts.router)  # alerts of the establishment
    app.include_router(bounces.router)  # the suppression list
    app.include_router(bounces.check_router)  # the domain check
    app.include_router(bounces.mailbox_router)  # the bounce mailbox's check

    @app.get("/api/v1/health", tags=["operations"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers. No authentication."""
        return {"status": "ok"}

    web.install(app)
    return app
