"""DKIM keys of the establishment's domains, and the DNS records to publish."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from postier.core.accounts import require_admin
from postier.server.api.deps import Core, CurrentUser
from postier.server.api.views import ErrorResponse

router = APIRouter(prefix="/api/v1/dkim", tags=["deliverability"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (401, 403, 404, 422)
}


class DkimIn(BaseModel):
    domain: str = Field(description="An allowed domain (or the sender address's domain)")
    selector: str = Field("postier", description="DNS selector, e.g. postier or 2026")


class DkimOut(BaseModel):
    domain: str
    selector: str
    record_name: str = Field(description="Where to publish the TXT record")
    record_value: str = Field(description="The TXT record's value")


@router.get("", responses=_ERRORS)
async def list_keys(user: CurrentUser, core: Core) -> list[DkimOut]:
    """The domains Postier signs for, with the DNS record each needs (never a private key)."""
    require_admin(user)
    keys = await core.dkim_keys(user.establishment_id)
    return [DkimOut(domain=k.domain, selector=k.selector, record_name=k.record_name,
                    record_value=k.record_value) for k in keys.values()]


@router.post("", status_code=status.HTTP_201_CREATED, responses=_ERRORS)
async def generate(body: DkimIn, user: CurrentUser, core: Core) -> DkimOut:
    """Make (or replace) the key of a domain; publish the record before relying on it."""
    k = await core.dkim_generate(user, body.domain, body.selector)
    return DkimOut(domain=k.domain, selector=k.selector, record_name=k.record_name,
                   record_value=k.record_value)


@router.delete("/{domain}", status_code=status.HTTP_204_NO_CONTENT, responses=_ERRORS)
async def remove(domain: str, user: CurrentUser, core: Core) -> None:
    """Stop signing for a domain."""
    await core.dkim_remove(user, domain)
