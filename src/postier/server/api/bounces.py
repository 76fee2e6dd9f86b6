"""The suppression list (addresses the establishment no longer sends to, after a bounce,
a complaint or an administrator's decision) and the domain check (SPF, DKIM, DMARC)."""

from __future__ import annotations

import datetime
from typing import Any

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, Field

from postier.ops import bounces, sending_domain
from postier.ops.bounce_mailbox import MailboxError
from postier.server.api.deps import Core, CurrentUser, Lang
from postier.server.api.views import ErrorResponse
from postier.store.bounces import Suppression

router = APIRouter(prefix="/api/v1/suppressions", tags=["bounces"])
check_router = APIRouter(prefix="/api/v1/domains", tags=["bounces"])
mailbox_router = APIRouter(prefix="/api/v1/bounces", tags=["bounces"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (401, 403, 404, 422)
}


class SuppressionOut(BaseModel):
    address: str
    reason: str = Field(description="bounce, complaint, repeated (temporary failures on "
                        "several days) or manual")
    code: int | None = Field(description="The refusing server's reply code")
    status: str = Field(description="Its enhanced status code (5.1.1)")
    diagnostic: str = Field(description="Its words, or the administrator's note")
    message_id: str | None = Field(description="The e-mail whose bounce listed it")
    created_at: str
    created_by: str = Field(description="The administrator, or postier")


class SuppressionList(BaseModel):
    items: list[SuppressionOut]
    total: int = Field(description="Entries matching the search")


class SuppressionIn(BaseModel):
    address: str = Field(max_length=320, examples=["parent@example.org"])
    note: str = Field("", max_length=500, description="Why (kept with the entry)")


class DomainCheckIn(BaseModel):
    domain: str = Field(max_length=253, examples=["clg-moulin.ac-lyon.fr"])


def _out(entry: Suppression) -> SuppressionOut:
    return SuppressionOut(
        address=entry.address, reason=entry.reason, code=entry.code, status=entry.status,
        diagnostic=entry.diagnostic, message_id=entry.message_id,
        created_at=datetime.datetime.fromtimestamp(entry.created_at, datetime.UTC)
        .isoformat().replace("+00:00", "Z"),
        created_by=entry.created_by)


@router.get("", responses=_ERRORS)
async def list_suppressions(
    user: CurrentUser, core: Core,
    search: str = Query("", max_length=320, description="Part of the address"),
    limit: int = Query(100, ge=1, le=500), offset: int = Query(0, ge=0, le=10**9),
) -> SuppressionList:
    """Administrators: the establishment's suppression list, newest first. E-mails to
    these addresses are accepted, but these recipients are ``suppressed``: never tried."""
    items, total = await core.suppressions(user, search=search, limit=limit, offset=offset)
    return SuppressionList(items=[_out(e) for e in items], total=total)


@router.post("", status_code=status.HTTP_201_CREATED, responses=_ERRORS)
async def add_suppression(body: SuppressionIn, user: CurrentUser, core: Core
                          ) -> SuppressionOut:
    """Administrators: stop sending to an address (audited). Adding one already listed
    changes nothing and answers its entry."""
    return _out(await core.suppress(user, body.address, body.note))


@router.delete("/{address}", status_code=status.HTTP_204_NO_CONTENT, responses=_ERRORS)
async def lift_suppression(address: str, user: CurrentUser, core: Core) -> None:
    """Administrators: lift an address, so that e-mails reach it again (audited)."""
    await core.lift_suppression(user, address)


@check_router.post("/check", responses=_ERRORS)
async def check_domain(body: DomainCheckIn, user: CurrentUser, core: Core, lang: Lang
                       ) -> dict[str, Any]:
    """Administrators: is the domain's DNS right for the e-mails Postier sends? ``spf``
    (does the published SPF authorise the relay?), ``dkim`` (is the published key the one
    Postier signs with?), ``dmarc`` (is there a policy, and is the From aligned?), each
    ``{ok, found, expected, hint}`` with ``hint`` in the reader's language."""
    return await sending_domain.establishment_check(core, user, body.domain, lang)


class MailboxCheckIn(BaseModel):
    imap: dict[str, Any] | None = Field(
        None, description="Unsaved bounce mailbox settings (same shape as bounces.imap; "
        "the saved password when none is given); omitted: the saved mailbox")


class MailboxCheckOut(BaseModel):
    ok: bool = Field(description="Whether the mailbox could be read")
    unread: int | None = Field(description="Unread messages waiting in the folder")
    error: dict[str, Any] | None = Field(
        description="What failed and what to do ({code, message, hint}), when not ok")


@mailbox_router.post("/mailbox/check", responses=_ERRORS)
async def check_mailbox(body: MailboxCheckIn, user: CurrentUser, core: Core, lang: Lang
                        ) -> MailboxCheckOut:
    """Administrators: connect to the bounce mailbox, sign in and open its folder, without
    changing anything in it. When it cannot be read, ``error`` says what failed
    (connection, TLS certificate, sign-in, folder) and what to do, in the reader's
    language (code ``bounce_mailbox``)."""
    try:
        unread = await bounces.check_establishment_mailbox(core, user, body.imap)
    except MailboxError as exc:
        return MailboxCheckOut(ok=False, unread=None, error=exc.render(lang))
    return MailboxCheckOut(ok=True, unread=unread, error=None)
