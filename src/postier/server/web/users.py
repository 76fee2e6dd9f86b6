"""Users (administrators): add one, change their role, disable them, reset their password,
and manage their API tokens (a new token is shown once, on the page that created it)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from postier.errors import PostierError
from postier.i18n import N_
from postier.server.web.context import (
    AdminPage,
    Page,
    checked_form,
    flash_url,
    redirect,
    render,
    text,
)
from postier.server.web.forms import checkbox, error_text

router = APIRouter(include_in_schema=False)

MIN_PASSWORD = 8
SHORT_PASSWORD = N_("A password has at least 8 characters.")


async def _users_page(p: Page, *, status_code: int = 200, errors: dict[str, str] | None = None,
                      values: dict[str, str] | None = None) -> Response:
    users = await p.core.admin.list_users(p.me)
    return render(p, "users.html", status_code, title=p._("Users"), users=users,
                  errors=errors or {}, v=values or {"role": "user"})


async def _user_page(p: Page, username: str, *, status_code: int = 200,
                     errors: dict[str, str] | None = None,
                     new_token: str | None = None) -> Response:
    target = await p.core.admin.target(p.me, username)
    tokens = await p.core.admin.list_tokens(p.me, target.username)
    return render(p, "user.html", status_code, title=target.display_name or target.username,
                  target=target, tokens=tokens, errors=errors or {}, new_token=new_token)


@router.get("/users")
async def users(p: AdminPage) -> Response:
    return await _users_page(p)


@router.post("/users")
async def create_user(p: AdminPage) -> Response:
    form = await checked_form(p)
    values = {k: text(form, k).strip() for k in ("username", "email", "name", "role")}
    password = text(form, "password")
    if password and len(password) < MIN_PASSWORD:
        return await _users_page(p, status_code=422, values=values,
                                 errors={"password": p._(SHORT_PASSWORD)})
    try:
        created = await p.core.admin.create_user(
            p.me, username=values["username"], email=values["email"],
            display_name=values["name"], role=values["role"] or "user",
            password=password or None,
        )
    except PostierError as exc:
        field = {"name": "name", "role": "role", "username": "username"}.get(exc.field or "")
        if field is None:
            field = "email" if exc.code == "invalid_address" else "username"
        return await _users_page(p, status_code=422, values=values,
                                 errors={field: error_text(exc, p.lang)})
    return redirect(flash_url(f"/users/{created.username}", "user_created"))


@router.get("/users/{username}")
async def user_detail(username: str, p: AdminPage) -> Response:
    return await _user_page(p, username)


@router.post("/users/{username}")
async def update_user(username: str, p: AdminPage) -> Response:
    form = await checked_form(p)
    disabled = checkbox(form, "disabled")
    try:
        target = await p.core.admin.update_user(
            p.me, username, email=text(form, "email").strip(),
            display_name=text(form, "name"), role=text(form, "role") or None,
        )
        if disabled and not target.disabled:
            await p.core.admin.disable_user(p.me, username)
        elif not disabled and target.disabled:
            await p.core.admin.update_user(p.me, username, disabled=False)
    except PostierError as exc:
        if exc.http_status == 404:
            raise
        field = exc.field if exc.field in ("name", "role", "disabled") else "email"
        return await _user_page(p, username, status_code=422,
                                errors={field: error_text(exc, p.lang)})
    return redirect(flash_url(f"/users/{username}", "user_saved"))


@router.post("/users/{username}/password")
async def reset_password(username: str, p: AdminPage) -> Response:
    form = await checked_form(p)
    password = text(form, "password")
    if len(password) < MIN_PASSWORD:
        return await _user_page(p, username, status_code=422,
                                errors={"password": p._(SHORT_PASSWORD)})
    await p.core.admin.update_user(p.me, username, password=password)
    return redirect(flash_url(f"/users/{username}", "password_reset"))


@router.post("/users/{username}/tokens")
async def create_token(username: str, p: AdminPage) -> Response:
    form = await checked_form(p)
    token, _info = await p.core.admin.create_token(p.me, text(form, "name").strip()[:100],
                                                   username)
    return await _user_page(p, username, new_token=token)


@router.post("/users/{username}/tokens/{token_id}/revoke")
async def revoke_token(username: str, token_id: int, p: AdminPage) -> Response:
    await checked_form(p)
    await p.core.admin.revoke_token(p.me, token_id, username)
    return redirect(flash_url(f"/users/{username}", "token_revoked"))
