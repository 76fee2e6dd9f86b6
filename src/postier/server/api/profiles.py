"""Sending profiles ("profils d'envoi d'e-mails"): administrators define them, users
retrieve one into their workstation settings."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, status
from pydantic import BaseModel, Field

from postier.core.relay_warnings import profile_warnings
from postier.server.api.admin import TestOut
from postier.server.api.deps import Core, CurrentUser, Lang
from postier.server.api.views import ErrorResponse

router = APIRouter(prefix="/api/v1/profiles", tags=["profiles"])
# Database ids are 64-bit: anything beyond is no profile (and must not reach the driver).
ProfileId = Annotated[int, Path(ge=1, le=2**63 - 1)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (401, 403, 404, 422)
}
_EXAMPLE = {
    "label": "Messagerie académique",
    "host": "smtp.ac-lyon.fr",
    "port": 587,
    "security": "starttls",
    "auth": "password",
    "username": "",
    "password": None,
    "timeout": 30,
}


@router.get("", responses=_ERRORS)
async def list_profiles(user: CurrentUser, core: Core) -> list[dict[str, Any]]:
    """Every profile of the establishment (no password in any listing)."""
    return await core.admin.list_profiles(user)


@router.post("", status_code=status.HTTP_201_CREATED, responses=_ERRORS)
async def create_profile(
    user: CurrentUser,
    core: Core,
    lang: Lang,
    payload: dict[str, Any] = Body(..., examples=[_EXAMPLE]),
) -> dict[str, Any]:
    """Create a profile (administrators). The label must be unique; the username and the
    shared password are optional, the password write-only. ``warnings``: e.g. a password
    that would travel without encryption (the profile is saved anyway)."""
    out = await core.admin.create_profile(user, payload)
    return out | {"warnings": profile_warnings(out, lang)}


@router.get("/{profile_id}", responses=_ERRORS)
async def get_profile(profile_id: ProfileId, user: CurrentUser, core: Core) -> dict[str, Any]:
    return await core.admin.get_profile(user, profile_id)


@router.put("/{profile_id}", responses=_ERRORS)
async def update_profile(
    profile_id: ProfileId,
    user: CurrentUser,
    core: Core,
    lang: Lang,
    payload: dict[str, Any] = Body(..., examples=[_EXAMPLE]),
) -> dict[str, Any]:
    """Replace a profile (administrators); omit ``password`` to keep the stored one,
    give ``""`` to remove it. ``warnings`` as for the creation."""
    out = await core.admin.update_profile(user, profile_id, payload)
    return out | {"warnings": profile_warnings(out, lang)}


@router.delete("/{profile_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_ERRORS)
async def delete_profile(profile_id: ProfileId, user: CurrentUser, core: Core) -> None:
    await core.admin.delete_profile(user, profile_id)


@router.post("/{profile_id}/retrieve", responses=_ERRORS)
async def retrieve_profile(profile_id: ProfileId, user: CurrentUser, core: Core) -> dict[str, Any]:
    """"Récupérer un profil d'envoi d'e-mails": what a workstation needs to send with
    this profile, including the shared password if the administrator stored one. Each
    retrieval is recorded."""
    return await core.admin.retrieve_profile(user, profile_id)


class ProfileTestIn(BaseModel):
    to: str | None = Field(None, description="Who receives the test e-mail; default: you")
    send: bool = Field(
        True, description="false: only check the connection (up to authentication); no "
        "e-mail is sent")
    profile: dict[str, Any] | None = Field(
        None, description="Unsaved fields of the profile to test (same shape as PUT); "
        "omitted: the saved profile")


@router.post("/{profile_id}/test", responses=_ERRORS)
async def test_profile(
    profile_id: ProfileId, body: ProfileTestIn, user: CurrentUser, core: Core, lang: Lang
) -> TestOut:
    """Administrators: check the profile's SMTP server or send a test e-mail through it
    (from your own address), reported step by step as for the settings' test."""
    report = await core.admin.test_profile(user, profile_id, body.profile, lang,
                                           to=body.to, send=body.send)
    return TestOut.model_validate(report.as_dict())
