"""The SQL of retention (:mod:`postier.ops.retention`): the purge of old bodies and
records, and what the store keeps about a person (their right of access)
(:class:`postier.store.reports.ReportStore`).

Every purge step is its own short transaction through the store's writer; the reads each
run in one transaction of their own (one consistent view).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from postier.errors import StoreUnavailable
from postier.store import schema as t
from postier.store.records import (
    FINAL_STATUSES,
    AttemptRecord,
    AuditEntry,
    RecipientState,
)
from postier.store.reports import PURGE_ACTION, PersonalData, Tally
from postier.store.sql_base import SQLBase
from postier.store.sql_messages import _message
from postier.store.sql_reports import count_attempts

T = TypeVar("T")
# Messages whose recipients and attempts are read in one statement.
CHUNK = 500


def _final_before(establishment_id: int, cutoff: float) -> Any:
    m = t.messages.c
    return and_(
        m.establishment_id == establishment_id,
        m.status.in_(FINAL_STATUSES),
        m.updated_at < cutoff,
    )


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class SQLRetention(SQLBase):
    """The purge and the right of access, in SQL."""

    async def _reading(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``work`` on one read connection (one consistent view); database trouble
        becomes the usual "try again later" error."""
        try:
            async with self.read_engine.connect() as conn, conn.begin():
                return await work(conn)
        except DBAPIError as exc:
            text = str(exc.orig or exc).lower()
            reason = ("database locked" if ("locked" in text or "busy" in text)
                      else "database error")
            raise StoreUnavailable(reason=reason) from exc

    async def settings_documents(self, *, disabled: bool = True
                                 ) -> list[tuple[int, str, bool, str | None]]:
        async def read(conn: AsyncConnection) -> list[tuple[int, str, bool, str | None]]:
            e = t.establishments.c
            stmt = (select(e.id, e.slug, e.hosted, t.settings.c.data)
                    .select_from(t.establishments.outerjoin(
                        t.settings, t.settings.c.establishment_id == e.id)))
            if not disabled:
                stmt = stmt.where(e.disabled.is_(False))
            rows = await conn.execute(stmt.order_by(e.id))
            return [(int(i), str(s), bool(h), d) for i, s, h, d in rows]

        return await self._reading(read)

    async def settings_document(self, establishment_id: int) -> str | None:
        async def read(conn: AsyncConnection) -> str | None:
            data: str | None = (await conn.execute(select(t.settings.c.data).where(
                t.settings.c.establishment_id == establishment_id))).scalar()
            return data

        return await self._reading(read)

    # -- bodies --------------------------------------------------------------------------
    async def body_page(self, after: str, limit: int) -> list[tuple[str, int, str, float]]:
        async def read(conn: AsyncConnection) -> list[tuple[str, int, str, float]]:
            b, m = t.bodies.c, t.messages.c
            rows = await conn.execute(
                select(b.message_id, m.establishment_id, m.status, m.updated_at)
                .select_from(t.bodies.join(t.messages, m.id == b.message_id))
                .where(b.message_id > after)
                .order_by(b.message_id)
                .limit(limit)
            )
            return [(str(i), int(e), str(s), float(u)) for i, e, s, u in rows]

        return await self._reading(read)

    async def delete_final_bodies(self, establishment_id: int, ids: Sequence[str],
                                  cutoff: float) -> int:
        b, m = t.bodies.c, t.messages.c
        # Checked again inside the transaction: an e-mail retried meanwhile is no longer
        # final and keeps its body.
        still = select(m.id).where(m.id.in_(ids), _final_before(establishment_id, cutoff))

        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(delete(t.bodies).where(b.message_id.in_(still)))
            return int(res.rowcount)

        return int(await self.write(job))

    # -- records -------------------------------------------------------------------------
    def _purgeable(self, establishment_id: int, cutoff: float) -> Any:
        m = t.messages.c
        # created_at <= updated_at: the extra bound lets the (establishment, status,
        # created_at) index find the candidates without reading the whole history.
        return and_(_final_before(establishment_id, cutoff), m.created_at < cutoff)

    async def count_purgeable(self, establishment_id: int, cutoff: float) -> int:
        cond = self._purgeable(establishment_id, cutoff)

        async def count(conn: AsyncConnection) -> int:
            return int((await conn.execute(select(func.count()).where(cond))).scalar() or 0)

        return await self._reading(count)

    async def purge_records(
        self, establishment_id: int, cutoff: float, batch: int, *, actor: str,
        before: str | None, audit_id: int | None, purged: int, counted: Tally,
    ) -> tuple[int, int | None, Tally]:
        m = t.messages.c
        cond = self._purgeable(establishment_id, cutoff)

        async def job(conn: AsyncConnection) -> tuple[int, int | None, Tally]:
            # Rows another process is purging right now are skipped (PostgreSQL); SQLite
            # has a single writer anyway.
            ids = [
                r[0]
                for r in await conn.execute(
                    select(m.id).where(cond).order_by(m.created_at).limit(batch)
                    .with_for_update(skip_locked=True)
                )
            ]
            if not ids:
                return 0, audit_id, counted
            tally = await count_attempts(conn, t.attempts.c.message_id.in_(ids))
            tally.accepted = {establishment_id: len(ids)}
            for table, column in ((t.attempts, t.attempts.c.message_id),
                                  (t.bounces, t.bounces.c.message_id),
                                  (t.recipients, t.recipients.c.message_id),
                                  (t.bodies, t.bodies.c.message_id)):
                await conn.execute(delete(table).where(column.in_(ids)))
            await conn.execute(delete(t.messages).where(m.id.in_(ids)))
            total = counted.copy()
            total.add(tally)
            details = json.dumps({
                "before": before,
                "messages": purged + len(ids),
                "counted": total.dump(establishment_id),
            }, sort_keys=True)
            return len(ids), await _audit_purge(conn, establishment_id, actor, audit_id,
                                                details), total

        result: tuple[int, int | None, Tally] = await self.write(job)
        return result

    # -- the right of access -------------------------------------------------------------
    async def personal_data(self, user_id: int, establishment_id: int, username: str
                            ) -> PersonalData:
        async def read(conn: AsyncConnection) -> PersonalData:
            m = t.messages.c
            messages = [_message(row) for row in await conn.execute(
                select(t.messages).where(m.user_id == user_id)
                .order_by(m.created_at.desc(), m.id.desc())
            )]
            kept = await _fill_messages(conn, messages)
            audit = await conn.execute(
                select(t.audit_log)
                .where(t.audit_log.c.establishment_id == establishment_id,
                       or_(t.audit_log.c.actor == username,
                           t.audit_log.c.target == username))
                .order_by(t.audit_log.c.id)
            )
            return PersonalData(messages, kept, [
                AuditEntry(e.id, e.at, e.actor, e.action, e.target,
                           json.loads(e.details or "{}"))
                for e in audit])

        return await self._reading(read)


async def _audit_purge(conn: AsyncConnection, establishment_id: int, actor: str,
                       audit_id: int | None, details: str) -> int:
    """The run's one audit entry: written by its first batch, updated by the next ones."""
    if audit_id is None:
        res = await conn.execute(insert(t.audit_log).values(
            establishment_id=establishment_id, at=time.time(), actor=actor,
            action=PURGE_ACTION, target="", details=details,
        ))
        return int(res.inserted_primary_key[0])  # type: ignore[index]
    await conn.execute(update(t.audit_log).where(t.audit_log.c.id == audit_id)
                       .values(details=details))
    return audit_id


async def _fill_messages(conn: AsyncConnection, messages: list[Any]) -> set[str]:
    """Each message's recipients and attempts, in order; the ids of those whose body is
    still kept."""
    r, a, b = t.recipients.c, t.attempts.c, t.bodies.c
    by_id = {record.id: record for record in messages}
    kept: set[str] = set()
    for chunk in _chunks(list(by_id), CHUNK):
        for row in await conn.execute(
            select(t.recipients).where(r.message_id.in_(chunk))
            .order_by(r.message_id, r.position)
        ):
            by_id[row.message_id].recipients.append(
                RecipientState(row.position, row.address, row.status, row.code, row.reply))
        for row in await conn.execute(
            select(t.attempts).where(a.message_id.in_(chunk)).order_by(a.id)
        ):
            by_id[row.message_id].history.append(AttemptRecord(
                row.started_at, row.duration_ms, row.relay, row.outcome, row.code,
                row.detail, row.reason))
        kept.update(x for (x,) in await conn.execute(
            select(b.message_id).where(b.message_id.in_(chunk))))
    return kept
