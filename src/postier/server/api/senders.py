"""The caller's own sender addresses: verifying one with a code sent to it, listing,
removing (see :mod:`postier.core.sender_verification`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, status
from pydantic import BaseModel, Field

from postier.core.sender_verification import AddressState
from postier.server.api.deps import Core, CurrentUser, Lang
from postier.server.api.views import ErrorResponse, iso

router = APIRouter(prefix="/api/v1/account/sender-addresses", tags=["account"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (401, 403, 404, 409, 422, 429)
}

Address = Annotated[str, Path(max_length=320, description="The address, as listed")]


class AddressIn(BaseModel):
    address: str = Field(max_length=320, description="Your address, or one granted to you")


class CodeIn(BaseModel):
    code: str = Field(max_length=20, description="The 6 digits of the e-mail")


class AddressOut(BaseModel):
    address: str
    status: str = Field(description="verified | pending (a code is waiting) | expired | "
                        "locked (too many wrong codes: ask for a new one)")
    verified_at: str | None = None
    code_expires_at: str | None = None
    attempts_left: int | None = None


def address_out(state: AddressState) -> AddressOut:
    return AddressOut(address=state.address, status=state.status,
                      verified_at=iso(state.verified_at), code_expires_at=iso(state.expires_at),
                      attempts_left=state.attempts_left)


@router.get("", responses=_ERRORS)
async def list_addresses(user: CurrentUser, core: Core) -> list[AddressOut]:
    """Your verified sender addresses and those waiting for their code."""
    return [address_out(s) for s in await core.senders.listing(user)]


@router.post("", responses=_ERRORS)
async def request_code(body: AddressIn, user: CurrentUser, core: Core, lang: Lang) -> AddressOut:
    """E-mail a 6-digit code to the address (valid 30 minutes); nothing is sent when it is
    already verified. At most one code a minute per address and 5 a day."""
    return address_out(await core.senders.request(user, body.address, lang))


@router.post("/{address}/confirm", responses=_ERRORS)
async def confirm_code(address: Address, body: CodeIn, user: CurrentUser,
                       core: Core) -> AddressOut:
    """Enter the code received: the address is verified. After 5 wrong codes, ask for a
    new one."""
    return address_out(await core.senders.confirm(user, address, body.code))


@router.delete("/{address}", status_code=status.HTTP_204_NO_CONTENT, responses=_ERRORS)
async def remove_address(address: Address, user: CurrentUser, core: Core) -> None:
    """Forget one of your sender addresses (it must be verified again to be used)."""
    await core.senders.remove(user, address)
