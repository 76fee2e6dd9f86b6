"""What a user does with e-mails already in the queue: read them, list them, try again,
cancel, and (an administrator) send a sent e-mail again. Anybody sees their own e-mails,
an administrator the establishment's; another establishment's do not exist for them."""

from __future__ import annotations

import datetime
import time
from email.utils import format_datetime
from typing import Any

from postier.core import policy
from postier.core.accounts import require_admin
from postier.core.installation import Installation
from postier.core.pace import pace_for
from postier.core.queue_entry import new_message_id
from postier.core.sender_decision import message_id_for
from postier.errors import Conflict, InvalidInput, NotFound
from postier.i18n import N_
from postier.store.base import (
    CANCELLED,
    DEFERRED,
    FAILED,
    QUEUED,
    SENDING,
    SENT,
    EnqueueResult,
    MessageRecord,
    NewMessage,
    User,
)

RETRYABLE = (QUEUED, DEFERRED, FAILED)
_NOT_KEPT = N_("The content of this e-mail is no longer kept (retention of personal "
               "data): it cannot be sent again from here.")
_SEND_AGAIN = N_("Send it again from the application that wrote it.")


class QueueOperations:
    """Reading and acting on queued e-mails."""

    def __init__(self, installation: Installation) -> None:
        self.installation = installation
        self.store = installation.store

    async def get_message(self, user: User, message_id: str) -> MessageRecord:
        record = await self.store.get_message(message_id)
        # Another establishment's or another user's message does not exist for this user.
        if (
            record is None
            or record.establishment_id != user.establishment_id
            or (not user.is_admin and record.user_id != user.id)
        ):
            raise NotFound(N_("There is no e-mail {id} for you."), id=message_id)
        return record

    async def list_messages(
        self, user: User, status: str | None = None, limit: int = 100, mine: bool = False
    ) -> list[MessageRecord]:
        return await self.store.list_messages(
            establishment_id=user.establishment_id,
            user_id=None if (user.is_admin and not mine) else user.id,
            status=status,
            limit=limit,
        )

    async def retry(self, user: User, message_id: str) -> MessageRecord:
        record = await self.get_message(user, message_id)
        if record.status not in RETRYABLE:
            raise Conflict(
                N_("This e-mail is {status}: only waiting or failed e-mails can be retried."),
                status=record.status,
            )
        if not await self.store.has_body(message_id):
            raise Conflict(_NOT_KEPT, hint=_SEND_AGAIN)
        await self.store.retry_now(message_id, time.time())
        self.installation.wake_delivery()
        return await self.get_message(user, message_id)

    async def cancel(self, user: User, message_id: str) -> MessageRecord:
        record = await self.get_message(user, message_id)
        ok = await self.store.set_status(
            message_id, CANCELLED, from_statuses=(QUEUED, DEFERRED), now=time.time()
        )
        if not ok:
            hint = (
                N_("It is being sent right now; try again in a moment.")
                if record.status == SENDING
                else None
            )
            raise Conflict(
                N_("This e-mail is {status} and can no longer be cancelled."),
                hint=hint,
                status=record.status,
            )
        return await self.get_message(user, message_id)

    async def retry_all(self, user: User, status: str | None = None, mine: bool = False,
                        **narrower: Any) -> int:
        """Try again now every waiting or failed e-mail the list with the same filters shows
        ``user`` (an administrator: the establishment's unless ``mine``; anybody else:
        their own), in one transaction; how many. E-mails whose content is no longer kept
        are left as they are. ``narrower``: the queue page's other filters (sender,
        recipient, since, until; see :meth:`Store.retry_matching`)."""
        if status is not None and status not in RETRYABLE:
            raise InvalidInput(
                N_("Only waiting or failed e-mails can be retried, not {status} ones."),
                hint=N_("Choose the status queued, deferred or failed, or none."),
                field="status", status=status)
        everyone = user.is_admin and not mine
        count = await self.store.retry_matching(
            establishment_id=user.establishment_id, user_id=None if everyone else user.id,
            statuses=RETRYABLE if status is None else (status,), now=time.time(),
            **narrower)
        if count:
            self.installation.wake_delivery()
            await self.store.audit(user.establishment_id, user.username, "messages.retry_all",
                                   status or "", {"count": count, "everyone": everyone})
        return count

    async def resend(self, user: User, message_id: str) -> EnqueueResult:
        """An administrator sends a sent e-mail again: a new e-mail (new queue id and
        Message-ID, today's Date) with the same content, sender and recipients, in its
        author's name; the audit log says who resent it. It counts in the administrator's
        submission pace."""
        require_admin(user)
        record = await self.get_message(user, message_id)
        if record.status != SENT:
            raise Conflict(
                N_("This e-mail is {status}: only a sent e-mail can be sent again."),
                hint=N_("Retry a waiting or failed e-mail instead."), status=record.status)
        content = await self.store.get_content(message_id)
        if content is None:
            raise Conflict(_NOT_KEPT, hint=_SEND_AGAIN)
        config = self.installation.config
        new_mid = message_id_for(_sender_of(record), config.hostname)
        pace = pace_for(self.store, config)  # a resend counts as a submission
        await pace.take(user, len(record.recipients))
        try:
            (result,) = await self.store.enqueue([NewMessage(
                id=new_message_id(), establishment_id=record.establishment_id,
                user_id=record.user_id, priority=record.priority,
                envelope_from=record.envelope_from, header_from=record.header_from,
                message_id=new_mid, subject=record.subject, data=renewed(content[0], new_mid),
                recipients=[r.address for r in record.recipients], smtputf8=content[1],
                sender_rule=record.sender_rule)])
        except BaseException:
            pace.give_back(user, len(record.recipients))
            raise
        self.installation.wake_delivery()
        await self.store.audit(user.establishment_id, user.username, "message.resend",
                               record.id, {"new_id": result.id})
        return result


def _sender_of(record: MessageRecord) -> policy.SenderDecision:
    """As much of the decision an e-mail was sent with as its Message-ID needs."""
    return policy.SenderDecision(
        from_name="", from_address=record.envelope_from, reply_to=(),
        envelope_from=record.envelope_from, rule="outside_allowed",
        user_address=record.envelope_from, matched_pattern=None, allowed_domains=())


_RENEWED_FIELDS = (b"message-id", b"date")


def renewed(data: bytes, message_id: str) -> bytes:
    """Stored bytes with a new Message-ID and Date (every other field and the body kept):
    a receiving server that has seen the old Message-ID would drop the copy as a
    duplicate."""
    head, sep, body = data.partition(b"\r\n\r\n")
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):  # a folded field's continuation
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() in _RENEWED_FIELDS
        if not dropping:
            kept.append(line)
    fresh = [f"Message-ID: {message_id}".encode(),
             f"Date: {format_datetime(datetime.datetime.now(datetime.UTC))}".encode()]
    return b"\r\n".join([*fresh, *kept]) + sep + body
