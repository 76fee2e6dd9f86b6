"""Submitting e-mails and following what became of them."""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, Field, field_validator

from postier.core import policy
from postier.core.message import MessageIn, check_submitted_key
from postier.core.pace import pace_for
from postier.core.service import Postier
from postier.server.api.deps import Core, CurrentUser, JSONRoute, Lang
from postier.server.api.views import (
    Accepted,
    BatchAccepted,
    ErrorResponse,
    MessageView,
    accepted,
    message_view,
)
from postier.store.base import EnqueueResult, User

router = APIRouter(prefix="/api/v1/messages", tags=["messages"], route_class=JSONRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    409: {"model": ErrorResponse},
    413: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
    507: {"model": ErrorResponse},
}
# The submissions may also be refused for the pace: 429 with Retry-After (pace.py).
_LIMITED: dict[int | str, dict[str, Any]] = {
    **_ERRORS, 429: {"model": ErrorResponse, "headers": {"Retry-After": {
        "description": "Seconds until the limit reached starts again from zero",
        "schema": {"type": "integer"}}}},
}


class RawIn(BaseModel):
    """An e-mail already written (RFC 5322 bytes), as SMTP submission receives it."""

    envelope_from: str = Field(description="The envelope sender (MAIL FROM)")
    recipients: list[str] = Field(min_length=1, max_length=1000)
    data: str = Field(description="The message, base64; lines end with CRLF")
    smtputf8: bool = False
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("recipients")
    @classmethod
    def _recipients(cls, value: list[str]) -> list[str]:
        return [policy.normalize_address(a) for a in value]

    @field_validator("data")
    @classmethod
    def _data(cls, value: str) -> str:
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise ValueError("data is not valid base64") from exc
        if re.search(rb"\r(?!\n)|(?<!\r)\n", raw):
            raise ValueError("the message has a bare CR or LF; lines must end with CRLF")
        return value


class BatchIn(BaseModel):
    messages: list[MessageIn] = Field(min_length=1, max_length=5000)


def _recipients(msg: MessageIn) -> int:
    return len(msg.to) + len(msg.cc) + len(msg.bcc)


async def _paced(core: Postier, user: User, counts: list[int],
                 submit: Callable[[], Awaitable[list[EnqueueResult]]]) -> list[EnqueueResult]:
    """Submit once the submission pace admitted every recipient (``counts``: per e-mail);
    what was not queued after all (an error, a duplicate) is given back."""
    pace = pace_for(core.store, core.config)
    total = sum(counts)
    await pace.take(user, total)
    try:
        results = await submit()
    except BaseException:
        pace.give_back(user, total)
        raise
    again = sum(n for n, r in zip(counts, results, strict=True) if r.duplicate)
    if again:
        pace.give_back(user, again)
    return results


@router.post("", status_code=status.HTTP_202_ACCEPTED, responses=_LIMITED)
async def submit(msg: MessageIn, user: CurrentUser, core: Core, lang: Lang) -> Accepted:
    """Accept an e-mail: answered once it is durably stored; delivery happens later."""
    check_submitted_key(msg.idempotency_key)
    (result,) = await _paced(core, user, [_recipients(msg)],
                             lambda: core.submit(user, [msg]))
    return accepted(result, lang)


@router.post("/batch", status_code=status.HTTP_202_ACCEPTED, responses=_LIMITED)
async def submit_batch(batch: BatchIn, user: CurrentUser, core: Core,
                       lang: Lang) -> BatchAccepted:
    """Accept many e-mails in one durable commit: all are stored, or none (the
    submission pace too admits the whole batch or nothing of it)."""
    for i, msg in enumerate(batch.messages):
        if msg.idempotency_key is not None:
            check_submitted_key(msg.idempotency_key, f"messages.{i}.idempotency_key")
    results = await _paced(core, user, [_recipients(m) for m in batch.messages],
                           lambda: core.submit(user, batch.messages))
    return BatchAccepted(messages=[accepted(r, lang) for r in results])


@router.post("/raw", status_code=status.HTTP_202_ACCEPTED, responses=_ERRORS)
async def submit_raw(body: RawIn, user: CurrentUser, core: Core, lang: Lang) -> Accepted:
    """Accept an e-mail already written, with the same checks as SMTP submission (the
    envelope sender and the From must be yours) and the sender policy. This is how a
    Postier server hands its e-mails on to another (its account has the ``relay`` role)."""
    check_submitted_key(body.idempotency_key)

    async def submit() -> list[EnqueueResult]:
        return [await core.submit_raw(
            user, body.envelope_from, body.recipients, base64.b64decode(body.data),
            smtputf8=body.smtputf8, idempotency_key=body.idempotency_key,
        )]

    (result,) = await _paced(core, user, [len(body.recipients)], submit)
    return accepted(result, lang)


@router.get("", responses=_ERRORS)
async def list_messages(
    user: CurrentUser,
    core: Core,
    lang: Lang,
    status_: Annotated[
        Literal["queued", "sending", "deferred", "sent", "failed", "cancelled"] | None,
        Query(alias="status"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    mine: bool = False,
) -> list[MessageView]:
    """Recent e-mails, newest first: a user's own, or all of the establishment's for an
    administrator (``mine=true`` to see only one's own)."""
    records = await core.list_messages(user, status_, limit, mine)
    return [MessageView.model_validate(message_view(r, lang)) for r in records]


class RetryAllIn(BaseModel):
    """Which e-mails to try again: the filters GET /api/v1/messages takes."""

    status: Literal["queued", "deferred", "failed"] | None = Field(
        None, description="Only e-mails with this status; none: every waiting or failed one")
    mine: bool = Field(False, description="An administrator's own e-mails only")


class RetriedOut(BaseModel):
    retried: int = Field(description="How many e-mails were made due now")


@router.post("/retry", responses=_ERRORS)
async def retry_all(body: RetryAllIn, user: CurrentUser, core: Core) -> RetriedOut:
    """Try again now every waiting or failed e-mail the list shows you with these filters
    (after an outage of the relay, for example): your own, or all of the establishment's
    for an administrator. E-mails whose content is no longer kept are left alone."""
    return RetriedOut(retried=await core.retry_all(user, body.status, body.mine))


@router.get("/{message_id}", responses=_ERRORS)
async def get_message(message_id: str, user: CurrentUser, core: Core, lang: Lang) -> MessageView:
    """One e-mail with its recipients' results and every delivery attempt."""
    record = await core.get_message(user, message_id)
    return MessageView.model_validate(message_view(record, lang, history=True))


@router.post("/{message_id}/retry", responses=_ERRORS)
async def retry(message_id: str, user: CurrentUser, core: Core, lang: Lang) -> MessageView:
    """Try a waiting or failed e-mail again now."""
    record = await core.retry(user, message_id)
    return MessageView.model_validate(message_view(record, lang, history=True))


@router.post("/{message_id}/cancel", responses=_ERRORS)
async def cancel(message_id: str, user: CurrentUser, core: Core, lang: Lang) -> MessageView:
    """Stop an e-mail that has not been sent yet."""
    record = await core.cancel(user, message_id)
    return MessageView.model_validate(message_view(record, lang, history=True))


@router.post("/{message_id}/resend", status_code=status.HTTP_202_ACCEPTED,
             responses=_LIMITED)
async def resend(message_id: str, user: CurrentUser, core: Core, lang: Lang) -> Accepted:
    """Administrators: send a sent e-mail again, as a new e-mail (new id and Message-ID)
    with the same content, sender and recipients. Counts in the submission pace."""
    return accepted(await core.resend(user, message_id), lang)
