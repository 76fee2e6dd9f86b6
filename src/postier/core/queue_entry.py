"""A rendered e-mail as the queue stores it: a fresh, time-ordered queue id and the
fields the store keeps beside the bytes."""

from __future__ import annotations

import secrets
import time

from postier.core.message import BuiltMessage
from postier.store.base import PRIORITIES, NewMessage

SYSTEM_USER = 0  # the author of the e-mails Postier itself sends (notices, alerts)


def new_message_id() -> str:
    """Time-ordered 32-hex id: recent messages sit together in the index."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def queued(
    built: BuiltMessage,
    header_from: str,
    *,
    establishment_id: int,
    user_id: int,
    priority: int = PRIORITIES["normal"],
    idempotency_key: str | None = None,
) -> NewMessage:
    """A rendered message as the queue stores it (a fresh queue id)."""
    return NewMessage(
        id=new_message_id(), establishment_id=establishment_id, user_id=user_id,
        priority=priority, envelope_from=built.envelope_from, header_from=header_from,
        message_id=built.message_id, subject=built.subject, data=built.data,
        recipients=built.recipients, smtputf8=built.smtputf8,
        idempotency_key=idempotency_key,
    )
