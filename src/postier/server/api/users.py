"""Users, API tokens and the audit log."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, status
from pydantic import BaseModel, Field

from postier.server.api.deps import Core, CurrentUser
from postier.server.api.views import ErrorResponse, iso
from postier.store.base import TokenInfo, User

router = APIRouter(prefix="/api/v1", tags=["users"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (401, 403, 404, 409, 422)
}


class UserOut(BaseModel):
    username: str
    email: str
    name: str
    role: str
    disabled: bool
    granted_senders: list[str]


class UserIn(BaseModel):
    username: str = Field(min_length=1, max_length=100)
    email: str
    name: str = Field("", max_length=200)
    role: str = "user"
    password: str | None = Field(None, min_length=8, max_length=1024)


class UserUpdate(BaseModel):
    email: str | None = None
    name: str | None = Field(None, max_length=200)
    role: str | None = None
    disabled: bool | None = None
    password: str | None = Field(None, min_length=8, max_length=1024)
    granted_senders: list[str] | None = Field(
        None, description="Other addresses this user may send as"
    )


class PasswordChange(BaseModel):
    current: str
    new: str = Field(min_length=8, max_length=1024)


class TokenIn(BaseModel):
    name: str = Field("", max_length=100)
    user: str | None = Field(None, description="Administrators: create it for this user")


class TokenOut(BaseModel):
    id: int
    name: str
    created_at: str | None
    revoked: bool


class TokenCreated(TokenOut):
    token: str = Field(description="Shown only once")


class AuditOut(BaseModel):
    at: str | None
    actor: str
    action: str
    target: str
    details: dict[str, Any]


def user_out(u: User) -> UserOut:
    return UserOut(username=u.username, email=u.email, name=u.display_name, role=u.role,
                   disabled=u.disabled, granted_senders=list(u.granted_senders))


def token_out(t: TokenInfo) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, "created_at": iso(t.created_at),
            "revoked": t.revoked_at is not None}


@router.get("/me", responses=_ERRORS)
async def me(user: CurrentUser) -> UserOut:
    return user_out(user)


@router.post("/me/password", status_code=status.HTTP_204_NO_CONTENT, responses=_ERRORS)
async def change_password(body: PasswordChange, user: CurrentUser, core: Core) -> None:
    await core.admin.change_own_password(user, body.current, body.new)


@router.get("/users", responses=_ERRORS)
async def list_users(user: CurrentUser, core: Core) -> list[UserOut]:
    return [user_out(u) for u in await core.admin.list_users(user)]


@router.post("/users", status_code=status.HTTP_201_CREATED, responses=_ERRORS)
async def create_user(body: UserIn, user: CurrentUser, core: Core) -> UserOut:
    created = await core.admin.create_user(
        user, username=body.username, email=body.email, display_name=body.name,
        role=body.role, password=body.password,
    )
    return user_out(created)


@router.put("/users/{username}", responses=_ERRORS)
async def update_user(username: str, body: UserUpdate, user: CurrentUser, core: Core) -> UserOut:
    updated = await core.admin.update_user(
        user, username, email=body.email, display_name=body.name, role=body.role,
        disabled=body.disabled, password=body.password, granted_senders=body.granted_senders,
    )
    return user_out(updated)


@router.delete("/users/{username}", responses=_ERRORS)
async def disable_user(username: str, user: CurrentUser, core: Core) -> UserOut:
    """Disable a user: they can no longer sign in and their tokens stop working at once.
    Their e-mails stay in the history."""
    return user_out(await core.admin.disable_user(user, username))


@router.get("/tokens", responses=_ERRORS)
async def list_tokens(user: CurrentUser, core: Core, username: str | None = None) -> list[TokenOut]:
    """Your tokens (administrators: ``?username=`` for another user's)."""
    return [TokenOut.model_validate(token_out(t))
            for t in await core.admin.list_tokens(user, username)]


@router.post("/tokens", status_code=status.HTTP_201_CREATED, responses=_ERRORS)
async def create_token(body: TokenIn, user: CurrentUser, core: Core) -> TokenCreated:
    token, info = await core.admin.create_token(user, body.name, body.user)
    return TokenCreated.model_validate({**token_out(info), "token": token})


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_ERRORS)
async def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=2**63 - 1)], user: CurrentUser, core: Core,
    username: str | None = None,
) -> None:
    await core.admin.revoke_token(user, token_id, username)


@router.get("/audit", responses=_ERRORS)
async def audit(user: CurrentUser, core: Core, limit: int = 200) -> list[AuditOut]:
    """Administrative changes, newest first: who changed which setting, profile, user or
    token, and when (never a secret's value)."""
    return [
        AuditOut(at=iso(e.at), actor=e.actor, action=e.action, target=e.target,
                 details=e.details)
        for e in await core.admin.audit_log(user, min(max(limit, 1), 1000))
    ]
