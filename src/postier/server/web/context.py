"""What every page needs: the reader's language, the session and its user, the role checks,
the CSRF check, and rendering a template with the security headers of the pages."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, cast
from urllib.parse import urlencode

from babel.dates import format_date, format_datetime, format_time, format_timedelta
from babel.numbers import format_decimal
from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import FormData

from postier import __version__
from postier.core import accounts
from postier.core.service import Postier
from postier.i18n import LANGUAGES, N_, negotiate, translate
from postier.ops.alerts import open_alerts
from postier.server.web.session import SESSION_COOKIE, Session, same_token, session_user, unseal
from postier.store.base import User

LANG_COOKIE = "postier_lang"
TEMPLATES = Path(__file__).parent / "templates"

# Every page: no caching (they show personal data), no framing, only our own assets.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}

STATUS_LABELS = {
    "queued": N_("Waiting"),
    "sending": N_("Being sent"),
    "deferred": N_("Will be retried"),
    "sent": N_("Sent"),
    "failed": N_("Failed"),
    "cancelled": N_("Cancelled"),
    "pending": N_("Waiting"),
    "bounced": N_("Returned (bounced)"),
    "suppressed": N_("Not sent: blocked address"),
}

ROLE_LABELS = {
    "admin": N_("Administrator"),
    "user": N_("User"),
    "operator": N_("Operator"),
    "relay": N_("Relay server"),
}

_env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def page_lang(request: Request) -> str:
    chosen = request.cookies.get(LANG_COOKIE)
    if chosen in LANGUAGES:
        return str(chosen)
    return negotiate(request.headers.get("accept-language"))


def local_path(value: str | None, default: str = "/") -> str:
    """``value`` if it is a path of this site (never another site's address)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    return value


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


class SignInRequired(Exception):
    """No valid session: the reader is sent to the sign-in page."""


class PageError(Exception):
    """A refusal shown as a page (or as JSON to the page's script)."""

    def __init__(self, status: int, message: str, hint: str | None = None,
                 **params: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.hint = hint
        self.params = params


@dataclass
class Page:
    """One request of a page: who asks, in which language, on which installation."""

    request: Request
    core: Postier
    lang: str
    session: Session | None
    user: User | None
    # Incidents open now, shown to administrators as a banner on every page.
    alerts: list[dict[str, Any]] = field(default_factory=list)

    def _(self, text: str, **params: Any) -> str:
        return translate(self.lang, text, **params)

    @property
    def me(self) -> User:
        assert self.user is not None, "only for pages that require a session"
        return self.user

    @property
    def client_address(self) -> str:
        return self.request.client.host if self.request.client else "?"

    @property
    def secure(self) -> bool:
        return self.request.url.scheme == "https"

    def datetime(self, ts: float | None, fmt: str = "short") -> str:
        if ts is None:
            return ""
        when = dt.datetime.fromtimestamp(ts).astimezone()
        return str(format_datetime(when, fmt, locale=self.lang))

    def short_date(self, iso: str) -> str:
        """A day (ISO, as the filters keep it) as the page's language writes it short:
        07/12/2026 in French, 12/7/26 in English."""
        if not iso:
            return ""
        return str(format_date(dt.date.fromisoformat(iso), "short", locale=self.lang))

    def updated_now(self) -> str:
        """When a live page was last refreshed, as a phrase ("Updated at 14:05:12")."""
        return self._(N_("Updated at {time}"), time=format_time(
            dt.datetime.now().astimezone(), "medium", locale=self.lang))

    def duration(self, seconds: float | int | None) -> str:
        if seconds is None:
            return ""
        return str(format_timedelta(dt.timedelta(seconds=seconds), locale=self.lang))

    def number(self, value: float | int) -> str:
        return str(format_decimal(value, locale=self.lang))

    def status(self, status: str) -> str:
        return self._(STATUS_LABELS.get(status, status))

    def role(self, role: str) -> str:
        return self._(ROLE_LABELS.get(role, role))

    def outranks(self, user: User) -> bool:
        """Whether ``user`` is beyond the signed-in person's reach (no page to change it)."""
        return accounts.rank(user.role) > accounts.rank(self.me.role)


def _security(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def render(p: Page, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    path = p.request.url.path
    query = p.request.url.query
    here = path + ("?" + query if query else "")
    values: dict[str, Any] = {
        "_": p._,
        "lang": p.lang,
        "user": p.user,
        "csrf": p.session.csrf if p.session else "",
        "here": here,
        "path": path,
        "version": __version__,
        "p": p,
        "iso": _iso,
        "qs": urlencode,
        **context,
    }
    html = _env.get_template(template).render(values)
    return cast(HTMLResponse, _security(HTMLResponse(html, status_code=status_code)))


def render_fragment(p: Page, template: str, **context: Any) -> str:
    """A piece of a page (for the scripts' live updates), rendered like the page."""
    values: dict[str, Any] = {"_": p._, "lang": p.lang, "user": p.user, "p": p,
                              "csrf": p.session.csrf if p.session else "", "iso": _iso,
                              "qs": urlencode, **context}
    return _env.get_template(template).render(values)


def json_response(data: Mapping[str, Any], status_code: int = 200) -> JSONResponse:
    return cast(JSONResponse, _security(JSONResponse(dict(data), status_code=status_code)))


def redirect(url: str) -> RedirectResponse:
    return cast(RedirectResponse, _security(RedirectResponse(url, status_code=303)))


# -- dependencies --------------------------------------------------------------------------


async def get_page(request: Request) -> Page:
    core: Postier = request.app.state.core
    session = unseal(core, request.cookies.get(SESSION_COOKIE))
    user = await session_user(core, session) if session is not None else None
    if user is None:
        session = None
    lang = page_lang(request)
    alerts: list[dict[str, Any]] = []
    if user is not None and user.is_admin:
        alerts = await open_alerts(core, user.establishment_id, lang)
    return Page(request, core, lang, session, user, alerts)


async def get_signed_in(p: Annotated[Page, Depends(get_page)]) -> Page:
    if p.user is None:
        raise SignInRequired()
    return p


async def get_admin(p: Annotated[Page, Depends(get_signed_in)]) -> Page:
    if not p.me.is_admin:
        raise PageError(403, N_("This page is for the establishment's administrators."),
                        N_("Ask an administrator if you need to change these settings."))
    return p


AnyPage = Annotated[Page, Depends(get_page)]
UserPage = Annotated[Page, Depends(get_signed_in)]
AdminPage = Annotated[Page, Depends(get_admin)]


def check_origin(request: Request) -> None:
    """A browser sends Origin with every POST; one from another site is refused."""
    origin = request.headers.get("origin")
    if origin and origin != "null":
        expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin.rstrip("/") != expected:
            raise PageError(403, N_("This form did not come from this site."),
                            N_("Reload the page and try again."))


async def checked_form(p: Page) -> FormData:
    """The posted form, once its CSRF token (field ``csrf`` or header ``X-CSRF-Token``)
    matches the session's."""
    check_origin(p.request)
    form = await p.request.form()
    given = p.request.headers.get("x-csrf-token") or form.get("csrf")
    if p.session is None or not same_token(given if isinstance(given, str) else None,
                                           p.session.csrf):
        raise PageError(403, N_("This form has expired or did not come from this site."),
                        N_("Reload the page and try again."))
    return form


def text(form: FormData, name: str, default: str = "") -> str:
    value = form.get(name)
    return value if isinstance(value, str) else default


def flash_url(path: str, key: str, **extra: str) -> str:
    return f"{path}?{urlencode({'ok': key, **extra})}"

