"""The setup page: the first administrator, created from the one-time address the server
prints at its first start (:mod:`postier.core.first_run`), who then lands signed in.

A used address answers 410, any other token 404 (the same page whether a setup is pending
or not); wrong tokens from one client address are held back like failed sign-ins.
"""

from __future__ import annotations

import secrets

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.datastructures import FormData

from postier.errors import PostierError
from postier.i18n import N_
from postier.server.web.account import home_for
from postier.server.web.context import AnyPage, Page, check_origin, redirect, render, text
from postier.server.web.forms import error_text
from postier.server.web.session import SESSION_COOKIE, new_session, same_token, seal
from postier.store.base import User

router = APIRouter(include_in_schema=False)

SETUP_CSRF_COOKIE = "postier_setup_csrf"
MIN_PASSWORD = 8

_GONE = {
    "used": (410, N_("This setup address was already used"),
             N_("The first administrator exists: sign in with their username or e-mail "
                "address and password.")),
    "expired": (410, N_("This setup address has expired"),
                N_("A setup address works for one hour. Restart the server: it prints a "
                   "new one.")),
    "unknown": (404, N_("There is no setup page at this address"),
                N_("Copy the whole address the server printed at its start (it ends with "
                   "token=…), or create the administrator at the server's console.")),
}
TOO_MANY = N_("Too many wrong setup addresses from your address. Wait {wait} before trying "
              "again.")
LABELS = {
    "username": N_("Username"),
    "name": N_("Your name"),
    "email": N_("E-mail address"),
    "password": N_("Password"),
    "confirm": N_("Password again"),
}


async def _refused(p: Page, verdict: str) -> Response:
    if verdict == "unknown":
        await p.core.setup_throttle.failed(p.client_address)
    status, title, hint = _GONE[verdict]
    return render(p, "setup.html", status, title=p._(title), message=p._(hint), form=None)


def _form_page(p: Page, token: str, *, status_code: int = 200,
               values: dict[str, str] | None = None,
               errors: dict[str, str] | None = None) -> Response:
    csrf = p.request.cookies.get(SETUP_CSRF_COOKIE) or secrets.token_urlsafe(32)
    labels = {k: p._(v) for k, v in LABELS.items()}
    response = render(p, "setup.html", status_code, title=p._("Create the administrator"),
                      form=values or {}, errors=errors or {}, labels=labels, token=token,
                      setup_csrf=csrf)
    response.set_cookie(SETUP_CSRF_COOKIE, csrf, httponly=True, samesite="lax",
                        secure=p.secure, path="/setup")
    return response


async def _gate(p: Page, token: str) -> Response | None:
    """The page refusing this token, or None when it may be used."""
    wait = await p.core.setup_throttle.wait(p.client_address)
    if wait > 0:
        return render(p, "setup.html", 429, title=p._("Create the administrator"),
                      message=p._(TOO_MANY, wait=p.duration(int(wait) + 1)), form=None)
    found = await p.core.check_setup_token(token)
    return None if found.verdict == "open" else await _refused(p, found.verdict)


@router.get("/setup")
async def setup_form(p: AnyPage, token: str = "") -> Response:
    refused = await _gate(p, token)
    return refused or _form_page(p, token)


def _problems(p: Page, form: FormData) -> dict[str, str]:
    errors: dict[str, str] = {}
    for name in ("username", "email"):
        if not text(form, name).strip():
            errors[name] = p._(N_("Fill in this field."))
    if len(text(form, "password")) < MIN_PASSWORD:
        errors["password"] = p._(N_("A password has at least 8 characters."))
    elif text(form, "password") != text(form, "confirm"):
        errors["confirm"] = p._(N_("The two passwords are different."))
    return errors


@router.post("/setup")
async def setup(p: AnyPage) -> Response:
    check_origin(p.request)
    form = await p.request.form()
    token = text(form, "token")
    refused = await _gate(p, token)
    if refused is not None:
        return refused
    values = {k: text(form, k) for k in ("username", "name", "email")}
    if not same_token(text(form, "csrf"), p.request.cookies.get(SETUP_CSRF_COOKIE, "")):
        return _form_page(p, token, status_code=403, values=values, errors={
            "username": p._(N_("The form had expired: please try again."))})
    errors = _problems(p, form)
    if errors:
        return _form_page(p, token, status_code=422, values=values, errors=errors)

    try:
        made = await p.core.admin.create_first_administrator(
            token, values["username"], values["email"], values["name"],
            text(form, "password"))
    except PostierError as exc:
        field = exc.field if exc.field in LABELS else "username"
        return _form_page(p, token, status_code=exc.http_status, values=values,
                          errors={field: error_text(exc, p.lang)})
    if not isinstance(made, User):
        return await _refused(p, made.verdict)
    return _signed_in(p, made)


def _signed_in(p: Page, user: User) -> Response:
    response = redirect(home_for(user))
    response.set_cookie(SESSION_COOKIE, seal(p.core, new_session(user)), httponly=True,
                        samesite="lax", secure=p.secure, path="/")
    response.delete_cookie(SETUP_CSRF_COOKIE, path="/setup")
    return response
