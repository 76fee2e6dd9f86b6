"""The workstation's local outbox: direct sending that never loses an e-mail either.

In ``own`` and ``profile`` modes an e-mail is built exactly as the server builds it, stored
first in a local SQLite queue (the same store and the same delivery code as the server),
then sent at once. A transient failure (relay down, timeout) leaves it in the outbox with
its reason; ``postier outbox flush`` — or the next send — tries again, and recipients that
already accepted it are never sent it twice.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from postier.client import Recipient, SendResult
from postier.delivery.relay import RelayPool
from postier.delivery.worker import deliver_one
from postier.errors import PostierError, load
from postier.message import MessageIn, build_message, make_message_id
from postier.policy import SenderDecision
from postier.service import queued
from postier.settings import DeliverySettings
from postier.store import create_store, database_url
from postier.store.base import DEFERRED, QUEUED, MessageRecord, Store
from postier.workstation import WorkstationSettings, outbox_dir

WORKSTATION_USER = 0


@contextlib.asynccontextmanager
async def open_outbox() -> AsyncIterator[Store]:
    directory = outbox_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = create_store(database_url(directory))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _delivery_settings(settings: WorkstationSettings) -> DeliverySettings:
    return DeliverySettings(relay=settings.smtp)


def _decision(settings: WorkstationSettings, msg: MessageIn) -> SenderDecision:
    # With its own SMTP account a workstation sends as itself; the relay is the judge.
    address = msg.from_ or settings.identity.address
    name = settings.identity.name if address == settings.identity.address else ""
    return SenderDecision(
        from_name=name, from_address=address, reply_to=tuple(msg.reply_to),
        envelope_from=address, rule="inside_allowed", user_address=address,
        matched_pattern=None, allowed_domains=(),
    )


def _result(record: MessageRecord) -> SendResult:
    status = {QUEUED: "kept", DEFERRED: "kept"}.get(record.status, record.status)
    error: PostierError | None = None
    if record.last_error:
        error = load(json.loads(record.last_error))
    return SendResult(
        status, record.id, error,
        [Recipient(r.address, r.status, r.code, r.reply) for r in record.recipients],
    )


async def send_direct(
    settings: WorkstationSettings, payload: dict[str, Any], lang: str
) -> SendResult:
    """Store the e-mail in the outbox, then deliver what is due (this one first)."""
    msg = MessageIn.model_validate(payload)
    decision = _decision(settings, msg)
    built = build_message(
        msg, decision,
        message_id=make_message_id(settings.identity.address.rpartition("@")[2] or "localhost"),
    )
    async with open_outbox() as store:
        (res,) = await store.enqueue([
            queued(built, decision.formatted_from, establishment_id=1,
                   user_id=WORKSTATION_USER, idempotency_key=msg.idempotency_key)
        ])
        await _deliver_due(store, settings)
        record = await store.get_message(res.id)
        assert record is not None
        return _result(record)


async def _deliver_due(store: Store, settings: WorkstationSettings) -> None:
    worker = f"workstation-{uuid.uuid4().hex[:8]}"
    delivery = _delivery_settings(settings)
    pool = RelayPool(concurrency=2, down_for=0)
    try:
        while True:
            claimed = await store.claim(worker, 20, lease_seconds=600, now=time.time())
            if not claimed:
                return
            outcomes = [await deliver_one(c, delivery, pool) for c in claimed]
            await store.record_outcomes(worker, outcomes)
    finally:
        await store.release_worker(worker)
        await pool.close()


async def flush(settings: WorkstationSettings) -> list[SendResult]:
    """Try every waiting e-mail now; returns what became of each."""
    async with open_outbox() as store:
        waiting = await store.list_messages(establishment_id=1, limit=10_000)
        now = time.time()
        ids = [m.id for m in waiting if m.status in (QUEUED, DEFERRED)]
        for mid in ids:
            await store.set_status(mid, QUEUED, from_statuses=(QUEUED, DEFERRED), now=now,
                                   next_attempt_at=now)
        await _deliver_due(store, settings)
        out = []
        for mid in ids:
            record = await store.get_message(mid)
            if record is not None:
                out.append(_result(record))
        return out


async def listing(limit: int = 100) -> list[MessageRecord]:
    async with open_outbox() as store:
        return await store.list_messages(establishment_id=1, limit=limit)


async def get(message_id: str) -> MessageRecord | None:
    async with open_outbox() as store:
        return await store.get_message(message_id)

