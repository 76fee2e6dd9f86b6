"""JSON shapes of the API's answers (also their OpenAPI description)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from postier.core import reasons
from postier.core.reasons import explain_error
from postier.core.sender_verification import NOTE_UNVERIFIED
from postier.i18n import translate
from postier.store.base import FINAL_STATUSES, EnqueueResult, MessageRecord


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code")
    message: str = Field(description="What happened, in the caller's language")
    hint: str | None = Field(None, description="What to do about it")
    field: str | None = Field(None, description="The input field at fault, if any")
    problems: list[dict[str, Any]] | None = Field(
        None, description="Every problem found in the input (422), the first one above"
    )


class ErrorResponse(BaseModel):
    error: ErrorBody


class Accepted(BaseModel):
    id: str
    status: str
    duplicate: bool = Field(False, description="True when the idempotency key was seen before")
    sender_note: str | None = Field(
        None, description="Why the From is not the address asked for, when the user should "
        "act (sender address not verified)")


class BatchAccepted(BaseModel):
    messages: list[Accepted]


class RecipientView(BaseModel):
    address: str
    status: str = Field(description="pending | sent | deferred | failed")
    code: int | None = None
    reply: str | None = None


class ReasonView(BaseModel):
    """Why an e-mail waits or failed, as a code and its parameters (see postier.core.reasons)."""

    code: str = Field(description="Stable machine-readable code (timeout, refused, "
                      "recipient_refused, ...)")
    params: dict[str, Any] = Field(description="The code's parameters (host, port, step, "
                                   "timeout, reply_code, ...)")
    transient: bool = Field(description="True when Postier keeps trying")
    sender: str = Field(description="What happens to the e-mail and whether the sender has "
                        "anything to do, in the caller's language")
    message: str = Field(description="What went wrong, for an administrator, in the "
                         "caller's language")
    hint: str | None = Field(None, description="What an administrator may change")
    reply: str | None = Field(None, description="The relay's reply (SMTP code and text), "
                              "only when a relay replied")


class AttemptView(BaseModel):
    at: str
    duration_ms: int
    relay: str
    outcome: str
    code: int | None = None
    detail: str | None = Field(None, description="An English line for logs; read reason")
    reason: ReasonView | None = Field(
        None, description="Why this attempt did not deliver; none when it delivered and for "
        "attempts recorded by an older version (read detail)")


class MessageView(BaseModel):
    id: str
    status: str = Field(description="queued | sending | deferred | sent | failed | cancelled")
    subject: str
    sender: str = Field(description="The From header after the sender policy")
    envelope_from: str
    message_id: str
    size: int
    attempts: int
    created_at: str
    updated_at: str
    next_attempt_at: str | None
    last_error: ErrorBody | None
    reason: ReasonView | None = Field(
        None, description="Why the e-mail waits or failed, as a code and its parameters")
    recipients: list[RecipientView]
    history: list[AttemptView] | None = None
    sender_note: str | None = Field(
        None, description="Why the From is not the address asked for, when the user should "
        "act (sender address not verified)")


def sender_note(rule: str | None, lang: str) -> str | None:
    """What the user should know about the sender chosen for an e-mail, if anything."""
    return translate(lang, NOTE_UNVERIFIED) if rule == "unverified_sender" else None


def accepted(result: EnqueueResult, lang: str) -> Accepted:
    return Accepted(id=result.id, status=result.status, duplicate=result.duplicate,
                    sender_note=sender_note(result.sender_rule, lang))


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def message_view(r: MessageRecord, lang: str, *, history: bool = False) -> dict[str, Any]:
    return {
        "id": r.id,
        "status": r.status,
        "subject": r.subject,
        "sender": r.header_from,
        "envelope_from": r.envelope_from,
        "message_id": r.message_id,
        "size": r.size,
        "attempts": r.attempts,
        "created_at": iso(r.created_at),
        "updated_at": iso(r.updated_at),
        "next_attempt_at": None if r.status in FINAL_STATUSES else iso(r.next_attempt_at),
        "last_error": explain_error(r.last_error, lang),
        "reason": None if r.status in ("sent", "cancelled")
        else reasons.explain(r.last_error, lang, admin=True),
        "sender_note": sender_note(r.sender_rule, lang),
        "recipients": [
            {"address": x.address, "status": x.status, "code": x.code, "reply": x.reply}
            for x in r.recipients
        ],
        "history": [
            {
                "at": iso(a.started_at),
                "duration_ms": a.duration_ms,
                "relay": a.relay,
                "outcome": a.outcome,
                "code": a.code,
                "detail": a.detail,
                "reason": reasons.explain(a.reason, lang, admin=True),
            }
            for a in r.history
        ]
        if history
        else None,
    }
