"""The SQL of reading and administering the queue's e-mails: one e-mail with its
recipients and attempts, lists, counts, status changes and retries
(:class:`postier.store.queue.QueueStore`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from postier.store import schema as t
from postier.store.records import (
    DEFERRED,
    FAILED,
    QUEUED,
    STATUSES,
    AttemptRecord,
    MessageRecord,
    RecipientState,
)
from postier.store.sql_base import SQLBase


def _message(row: Any) -> MessageRecord:
    return MessageRecord(
        id=row.id,
        establishment_id=row.establishment_id,
        user_id=row.user_id,
        status=row.status,
        priority=row.priority,
        envelope_from=row.envelope_from,
        header_from=row.header_from,
        message_id=row.message_id,
        subject=row.subject,
        size=row.size,
        created_at=row.created_at,
        updated_at=row.updated_at,
        next_attempt_at=row.next_attempt_at,
        attempts=row.attempts,
        last_error=row.last_error,
        idempotency_key=row.idempotency_key,
        sender_rule=row.sender_rule,
    )


class SQLMessages(SQLBase):
    """Reading and administering e-mails, in SQL."""

    async def get_message(self, message_id: str) -> MessageRecord | None:
        rows = await self._read(select(t.messages).where(t.messages.c.id == message_id))
        if not rows:
            return None
        record = _message(rows[0])
        record.recipients = [
            RecipientState(r.position, r.address, r.status, r.code, r.reply)
            for r in await self._read(
                select(t.recipients)
                .where(t.recipients.c.message_id == message_id)
                .order_by(t.recipients.c.position)
            )
        ]
        record.history = [
            AttemptRecord(r.started_at, r.duration_ms, r.relay, r.outcome, r.code, r.detail,
                          r.reason)
            for r in await self._read(
                select(t.attempts)
                .where(t.attempts.c.message_id == message_id)
                .order_by(t.attempts.c.id)
            )
        ]
        return record

    async def list_messages(
        self,
        *,
        establishment_id: int,
        user_id: int | None = None,
        status: str | None = None,
        limit: int = 100,
    ) -> list[MessageRecord]:
        stmt = select(t.messages).where(t.messages.c.establishment_id == establishment_id)
        if user_id is not None:
            stmt = stmt.where(t.messages.c.user_id == user_id)
        if status is not None:
            stmt = stmt.where(t.messages.c.status == status)
        stmt = stmt.order_by(t.messages.c.created_at.desc(), t.messages.c.id.desc()).limit(limit)
        records = [_message(r) for r in await self._read(stmt)]
        if records:
            by_id = {r.id: r for r in records}
            for r in await self._read(
                select(t.recipients)
                .where(t.recipients.c.message_id.in_(list(by_id)))
                .order_by(t.recipients.c.message_id, t.recipients.c.position)
            ):
                by_id[r.message_id].recipients.append(
                    RecipientState(r.position, r.address, r.status, r.code, r.reply)
                )
        return records

    async def set_status(
        self,
        message_id: str,
        status: str,
        *,
        from_statuses: Sequence[str],
        now: float,
        next_attempt_at: float | None = None,
    ) -> bool:
        values: dict[str, Any] = {"status": status, "updated_at": now}
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at

        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                update(t.messages)
                .where(t.messages.c.id == message_id, t.messages.c.status.in_(from_statuses))
                .values(**values)
            )
            return int(res.rowcount)

        return bool(await self.write(job))

    async def has_body(self, message_id: str) -> bool:
        rows = await self._read(
            select(t.bodies.c.message_id).where(t.bodies.c.message_id == message_id)
        )
        return bool(rows)

    async def retry_now(self, message_id: str, now: float) -> bool:
        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                update(t.messages)
                .where(
                    t.messages.c.id == message_id,
                    t.messages.c.status.in_((QUEUED, DEFERRED, FAILED)),
                )
                .values(status=QUEUED, next_attempt_at=now, updated_at=now)
            )
            if res.rowcount:
                await conn.execute(
                    update(t.recipients)
                    .where(
                        t.recipients.c.message_id == message_id,
                        t.recipients.c.status == FAILED,
                    )
                    .values(status="pending", updated_at=now)
                )
            return int(res.rowcount)

        return bool(await self.write(job))

    async def retry_matching(
        self, *, establishment_id: int, user_id: int | None, statuses: Sequence[str],
        now: float, sender: str | None = None, recipient: str | None = None,
        since: float | None = None, until: float | None = None,
    ) -> int:
        m, r = t.messages, t.recipients
        chosen = [m.c.establishment_id == establishment_id,
                  m.c.status.in_([s for s in statuses if s in (QUEUED, DEFERRED, FAILED)]),
                  select(t.bodies.c.message_id).where(t.bodies.c.message_id == m.c.id)
                  .exists()]
        if user_id is not None:
            chosen.append(m.c.user_id == user_id)
        if sender:
            chosen.append(m.c.header_from.icontains(sender, autoescape=True)
                          | m.c.envelope_from.icontains(sender, autoescape=True))
        if recipient:
            chosen.append(select(r.c.message_id).where(
                r.c.message_id == m.c.id,
                r.c.address.icontains(recipient, autoescape=True)).exists())
        if since is not None:
            chosen.append(m.c.created_at >= since)
        if until is not None:
            chosen.append(m.c.created_at < until)

        async def job(conn: AsyncConnection) -> int:
            # Recipients first, while the messages still have their old status; a message
            # in "sending" is left to its worker.
            await conn.execute(
                update(t.recipients)
                .where(t.recipients.c.status == FAILED,
                       t.recipients.c.message_id.in_(select(m.c.id).where(*chosen)))
                .values(status="pending", updated_at=now)
            )
            res = await conn.execute(
                update(m).where(*chosen).values(status=QUEUED, next_attempt_at=now,
                                                updated_at=now))
            return int(res.rowcount)

        return int(await self.write(job))

    async def get_content(self, message_id: str) -> tuple[bytes, bool] | None:
        rows = await self._read(
            select(t.bodies.c.data, t.messages.c.smtputf8)
            .join(t.messages, t.messages.c.id == t.bodies.c.message_id)
            .where(t.bodies.c.message_id == message_id))
        return (bytes(rows[0].data), bool(rows[0].smtputf8)) if rows else None

    async def counts(self, establishment_id: int | None = None) -> dict[str, int]:
        stmt = select(t.messages.c.status, func.count()).group_by(t.messages.c.status)
        if establishment_id is not None:
            stmt = stmt.where(t.messages.c.establishment_id == establishment_id)
        out = dict.fromkeys(STATUSES, 0)
        for status, n in await self._read(stmt):
            out[status] = int(n)
        return out

