"""Signing in and out, the language switch, and the signed-in user's own account
(password, API tokens and verified sender addresses)."""

from __future__ import annotations

import math
import secrets
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from postier.core.sender_verification import CODE_TTL
from postier.errors import PostierError
from postier.i18n import LANGUAGES, N_
from postier.server.web.context import (
    LANG_COOKIE,
    AnyPage,
    Page,
    UserPage,
    check_origin,
    checked_form,
    flash_url,
    local_path,
    redirect,
    render,
    text,
)
from postier.server.web.forms import error_text
from postier.server.web.session import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    end_session,
    new_session,
    same_token,
    seal,
)
from postier.store.base import User

router = APIRouter(include_in_schema=False)

WRONG = N_("Wrong username or password.")
TOO_MANY = N_("Too many failed attempts to sign in. For the security of the accounts, "
              "wait {wait} before trying again.")
MIN_PASSWORD = 8


def home_for(user: User) -> str:
    return "/queue" if user.is_admin else "/mine"


def _cookie(response: Response, p: Page, name: str, value: str, **kw: Any) -> None:
    response.set_cookie(name, value, httponly=True, samesite="lax", secure=p.secure,
                        path="/", **kw)


@router.get("/")
async def index(p: AnyPage) -> Response:
    return redirect(home_for(p.user) if p.user else "/login")


@router.get("/lang/{code}")
async def choose_language(code: str, p: AnyPage, next: str = "/") -> Response:
    response = redirect(local_path(next))
    if code in LANGUAGES:
        response.set_cookie(LANG_COOKIE, code, max_age=365 * 86400, samesite="lax",
                            secure=p.secure, path="/")
    return response


def _login_page(p: Page, *, status_code: int = 200, username: str = "", error: str = "",
                next_url: str = "") -> Response:
    token = secrets.token_urlsafe(32)
    response = render(p, "login.html", status_code, login_csrf=token, username=username,
                      error=error, next_url=next_url, title=p._("Sign in"))
    _cookie(response, p, LOGIN_CSRF_COOKIE, token)
    return response


@router.get("/login")
async def login_form(p: AnyPage, next: str = "") -> Response:
    if p.user is not None:
        return redirect(local_path(next, home_for(p.user)))
    return _login_page(p, next_url=local_path(next, ""))


@router.post("/login")
async def login(p: AnyPage) -> Response:
    check_origin(p.request)
    form = await p.request.form()
    identifier = text(form, "username").strip()
    password = text(form, "password")
    next_url = local_path(text(form, "next"), "")
    if not same_token(text(form, "csrf"), p.request.cookies.get(LOGIN_CSRF_COOKIE, "")):
        return _login_page(p, status_code=403, username=identifier, next_url=next_url,
                           error=p._(N_("The sign-in form had expired: please try again.")))
    if not identifier or not password:
        return _login_page(p, status_code=422, username=identifier, next_url=next_url,
                           error=p._(N_("Enter your username (or e-mail address) and your "
                                        "password.")))
    signed = await p.core.sign_in("web", identifier, password, p.client_address)
    if signed.wait > 0:
        return _login_page(p, status_code=429, username=identifier, next_url=next_url,
                           error=p._(TOO_MANY, wait=p.duration(math.ceil(signed.wait))))
    user = signed.user
    if user is None:
        return _login_page(p, status_code=401, username=identifier, next_url=next_url,
                           error=p._(WRONG))
    response = redirect(next_url or home_for(user))
    _cookie(response, p, SESSION_COOKIE, seal(p.core, new_session(user)))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


@router.post("/logout")
async def logout(p: AnyPage) -> Response:
    if p.session is not None:
        await checked_form(p)
        await end_session(p.core, p.session)
    response = redirect(flash_url("/login", "signed_out"))
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# -- own account ---------------------------------------------------------------------------


async def _account_page(p: Page, *, status_code: int = 200, errors: dict[str, str] | None = None,
                        new_token: str | None = None, sender_message: str = "",
                        sender_address: str | None = None) -> Response:
    tokens = await p.core.admin.list_tokens(p.me)
    settings = await p.core.delivery_settings(p.me.establishment_id)
    senders = await p.core.senders.listing(p.me)
    if sender_address is None:  # propose the user's own address until it is verified
        done = {s.address.lower() for s in senders if s.status == "verified"}
        sender_address = "" if p.me.email.lower() in done else p.me.email
    return render(p, "account.html", status_code, title=p._("My account"), tokens=tokens,
                  errors=errors or {}, new_token=new_token, senders=senders,
                  verify_senders=settings.verify_sender_addresses,
                  sender_message=sender_message, sender_address=sender_address)


@router.get("/account")
async def account(p: UserPage) -> Response:
    return await _account_page(p)


@router.post("/account/password")
async def change_password(p: UserPage) -> Response:
    form = await checked_form(p)
    current, new = text(form, "current"), text(form, "new")
    if len(new) < MIN_PASSWORD:
        return await _account_page(p, status_code=422, errors={
            "new": p._(N_("A password has at least 8 characters."))})
    if new != text(form, "confirm"):
        return await _account_page(p, status_code=422, errors={
            "confirm": p._(N_("The two passwords are different."))})
    try:
        await p.core.admin.change_own_password(p.me, current, new)
    except PostierError as exc:
        return await _account_page(p, status_code=422, errors={
            exc.field or "current": error_text(exc, p.lang)})
    # The session carried the old password's fingerprint: open a new one.
    user = await p.core.find_user(p.me.username, p.me.establishment_id)
    response = redirect(flash_url("/account", "password_changed"))
    _cookie(response, p, SESSION_COOKIE, seal(p.core, new_session(user)))
    return response


@router.post("/account/tokens")
async def create_own_token(p: UserPage) -> Response:
    form = await checked_form(p)
    name = text(form, "name").strip()[:100]
    token, _info = await p.core.admin.create_token(p.me, name)
    return await _account_page(p, new_token=token)


@router.post("/account/tokens/{token_id}/revoke")
async def revoke_own_token(token_id: int, p: UserPage) -> Response:
    await checked_form(p)
    await p.core.admin.revoke_token(p.me, token_id)
    return redirect(flash_url("/account", "token_revoked"))


# -- sender addresses (postier.core.sender_verification) ----------------------------

CODE_SENT = N_("A code was sent to {address}: enter it below within {minutes} minutes.")
VERIFIED = N_("{address} is verified: your e-mails leave with it as the sender.")
REMOVED = N_("{address} is no longer among your sender addresses.")


@router.post("/account/sender-addresses")
async def request_sender_code(p: UserPage) -> Response:
    form = await checked_form(p)
    address = text(form, "sender_address").strip()
    try:
        state = await p.core.senders.request(p.me, address, p.lang)
    except PostierError as exc:
        return await _account_page(p, status_code=exc.http_status, sender_address=address,
                                   errors={"sender_address": error_text(exc, p.lang)})
    message = (VERIFIED if state.status == "verified" else CODE_SENT)
    return await _account_page(p, sender_message=p._(message, address=state.address,
                                                     minutes=CODE_TTL // 60))


@router.post("/account/sender-addresses/confirm")
async def confirm_sender_code(p: UserPage) -> Response:
    form = await checked_form(p)
    address = text(form, "address")
    try:
        state = await p.core.senders.confirm(p.me, address, text(form, "code"))
    except PostierError as exc:
        return await _account_page(p, status_code=exc.http_status,
                                   errors={"sender_code": error_text(exc, p.lang)})
    return await _account_page(p, sender_message=p._(VERIFIED, address=state.address))


@router.post("/account/sender-addresses/remove")
async def remove_sender_address(p: UserPage) -> Response:
    form = await checked_form(p)
    address = text(form, "address")
    try:
        await p.core.senders.remove(p.me, address)
    except PostierError as exc:
        return await _account_page(p, status_code=exc.http_status,
                                   errors={"sender_code": error_text(exc, p.lang)})
    return await _account_page(p, sender_message=p._(REMOVED, address=address))
