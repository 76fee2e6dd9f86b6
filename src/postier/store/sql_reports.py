"""The SQL of the reports: the metrics' counts, the checks of ``postier doctor`` and the
queue page's activity chart and search (:class:`postier.store.reports.ReportStore`).

Every query here reads, except the two write probes (readiness and ``postier doctor``).
The metrics are counts of rows (see :mod:`postier.ops.metrics`): ``count_attempts`` is
shared with the retention purge, which records what it deletes in the same terms.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Float, Integer, and_, case, cast, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from postier.store import migrate
from postier.store import schema as t
from postier.store.records import SENT, STATUSES
from postier.store.reports import (
    LATENCY_BUCKETS,
    PURGE_ACTION,
    WAITING,
    MessageRow,
    MetricsRead,
    Tally,
)
from postier.store.sql_base import SQLBase

# How many recent attempts tell the state of each relay.
RELAY_WINDOW = 500


def _latency_expr() -> Any:
    a, m = t.attempts.c, t.messages.c
    return a.started_at + a.duration_ms / 1000.0 - m.created_at


async def count_attempts(conn: AsyncConnection, where: Any) -> Tally:
    """Outcomes by establishment and the latency histogram of the attempts ``where``
    selects (joined with their messages)."""
    a, m = t.attempts.c, t.messages.c
    latency = _latency_expr()
    sent = a.outcome == SENT
    columns = [
        m.establishment_id,
        a.outcome,
        func.count(),
        func.sum(case((sent, latency), else_=0.0)),
        *(func.sum(case((and_(sent, latency <= le), 1), else_=0)) for le in LATENCY_BUCKETS),
    ]
    stmt = (
        select(*columns)
        .select_from(t.attempts.join(t.messages, t.messages.c.id == a.message_id))
        .where(where)
        .group_by(m.establishment_id, a.outcome)
    )
    out = Tally()
    for row in await conn.execute(stmt):
        e, outcome, n, total, *cumulative = row
        key = (int(e), str(outcome))
        out.outcomes[key] = out.outcomes.get(key, 0) + int(n)
        if outcome == SENT:
            cum = [int(c or 0) for c in cumulative] + [int(n)]
            out.buckets = [
                acc + c - (cum[i - 1] if i else 0)
                for i, (acc, c) in enumerate(zip(out.buckets, cum, strict=True))
            ]
            out.latency_sum += float(total or 0.0)
    return out


async def count_accepted(conn: AsyncConnection, where: Any) -> dict[int, int]:
    m = t.messages.c
    rows = await conn.execute(
        select(m.establishment_id, func.count()).where(where).group_by(m.establishment_id)
    )
    return {int(e): int(n) for e, n in rows}


async def purged_tallies(conn: AsyncConnection, after_id: int = 0) -> tuple[Tally, int]:
    """What the retention purges deleted (audit entries after ``after_id``), and the last
    entry's id."""
    out = Tally()
    last = after_id
    rows = await conn.execute(
        select(t.audit_log.c.id, t.audit_log.c.establishment_id, t.audit_log.c.details)
        .where(t.audit_log.c.action == PURGE_ACTION, t.audit_log.c.id > after_id)
        .order_by(t.audit_log.c.id)
    )
    for audit_id, e, details in rows:
        last = max(last, int(audit_id))
        try:
            counted = json.loads(details).get("counted") or {}
        except (ValueError, AttributeError):
            continue
        out.add(Tally.load(int(e), counted))
    return out, last


async def waiting_messages(
    conn: AsyncConnection, establishment_ids: Sequence[int]
) -> tuple[dict[str, int], float | None]:
    """Messages waiting by status, and the creation time of the oldest. Naming every
    establishment lets the (establishment, status, created_at) index answer alone."""
    m = t.messages.c
    queue = dict.fromkeys(WAITING, 0)
    oldest: float | None = None
    rows = await conn.execute(
        select(m.status, func.count(), func.min(m.created_at))
        .where(m.establishment_id.in_(list(establishment_ids) or [0]), m.status.in_(WAITING))
        .group_by(m.status)
    )
    for status, n, first in rows:
        queue[str(status)] = int(n)
        if first is not None:
            oldest = float(first) if oldest is None else min(oldest, float(first))
    return queue, oldest


async def _recent_replies(conn: AsyncConnection) -> list[tuple[str, int | None]]:
    """The relay and reply code of the newest attempts, newest first."""
    a = t.attempts.c
    rows = await conn.execute(
        select(a.relay, a.code).order_by(a.id.desc()).limit(RELAY_WINDOW)
    )
    return [(str(relay), None if code is None else int(code)) for relay, code in rows]


async def _counted(conn: AsyncConnection, ids: list[int], msg_boundary: float,
                   since: tuple[float, int] | None) -> tuple[int, Tally, Tally]:
    """The newest attempt's id, what goes into the metrics' base (all of it when
    ``since`` is None, else what is new since the base's boundaries) and the tail."""
    m, a = t.messages.c, t.attempts.c
    # Every status and establishment named, so the index (establishment, status,
    # created_at) serves the time range.
    known = and_(m.establishment_id.in_(ids or [0]), m.status.in_(STATUSES))
    # Attempts are appended in id order: everything up to the newest id goes in the
    # base. (With several writers on PostgreSQL, a transaction committing out of id
    # order may be missed until the hourly recount: counted late, never twice.)
    att_boundary = int((await conn.execute(select(func.max(a.id)))).scalar() or 0)
    if since is None:
        base, _ = await purged_tallies(conn)
        base.add(Tally(accepted=await count_accepted(
            conn, and_(known, m.created_at < msg_boundary))))
        base.add(await count_attempts(conn, a.id <= att_boundary))
        msg_from, att_from = msg_boundary, att_boundary
    else:
        base = Tally()
        if msg_boundary > since[0]:
            base.accepted = await count_accepted(
                conn, and_(known, m.created_at >= since[0], m.created_at < msg_boundary))
        if att_boundary > since[1]:
            base.add(await count_attempts(
                conn, and_(a.id > since[1], a.id <= att_boundary)))
        msg_from, att_from = max(since[0], msg_boundary), max(since[1], att_boundary)
    tail = Tally(accepted=await count_accepted(conn, and_(known, m.created_at >= msg_from)))
    tail.add(await count_attempts(conn, a.id > att_from))
    return att_boundary, base, tail


class SQLReports(SQLBase):
    """The metrics' counts, ``postier doctor``'s reads and the queue page's queries."""

    # -- metrics -------------------------------------------------------------------------
    async def read_metrics(self, msg_boundary: float, since: tuple[float, int] | None
                           ) -> MetricsRead:
        async with self.read_engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # One consistent view of the rows, the purge tallies and the gauges.
                conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                establishments = {
                    int(r.id): str(r.slug)
                    for r in await conn.execute(select(t.establishments.c.id,
                                                       t.establishments.c.slug))
                }
                ids = list(establishments)
                att_boundary, base, tail = await _counted(conn, ids, msg_boundary, since)
                queue, oldest = await waiting_messages(conn, ids)
                replies = await _recent_replies(conn)
        return MetricsRead(establishments, att_boundary, base, tail, queue, oldest, replies)

    async def probe_writer(self) -> None:
        async def job(conn: AsyncConnection) -> None:
            first = select(func.min(t.establishments.c.id)).scalar_subquery()
            await conn.execute(
                update(t.establishments)
                .where(t.establishments.c.id == first)
                .values(disabled=t.establishments.c.disabled)
            )

        await self.write(job)

    # -- postier doctor ------------------------------------------------------------------
    async def migration_status(self) -> tuple[str | None, str]:
        async with self.read_engine.connect() as conn:
            return await conn.run_sync(migrate.status)

    async def probe_write_access(self) -> None:
        async with self.write_engine.connect() as conn:
            tx = await conn.begin()
            try:
                first = select(func.min(t.establishments.c.id)).scalar_subquery()
                await conn.execute(update(t.establishments)
                                   .where(t.establishments.c.id == first)
                                   .values(disabled=t.establishments.c.disabled))
            finally:
                await tx.rollback()

    async def waiting_now(self) -> tuple[dict[str, int], float | None]:
        async with self.read_engine.connect() as conn:
            ids = [i for (i,) in await conn.execute(select(t.establishments.c.id))]
            return await waiting_messages(conn, ids)

    async def stored_secrets(self) -> tuple[list[str], list[str]]:
        async with self.read_engine.connect() as conn:
            documents: list[str] = []
            for table in (t.settings, t.profiles):
                documents.extend(data for (data,) in await conn.execute(select(table.c.data)))
            values: list[str] = []
            for table in t.metadata.sorted_tables:
                columns = [c for c in table.c if c.name.endswith("_enc")]
                if columns:
                    for row in await conn.execute(select(*columns)):
                        values.extend(v for v in row if isinstance(v, str) and v)
            meta = t.metadata.tables.get("meta")
            if meta is not None:  # the key check value, where the schema has it
                values.extend(v for (v,) in await conn.execute(
                    select(meta.c.value).where(meta.c.key == "key_check")))
            return documents, values

    async def misplaced_operators(self, operators_establishment: int
                                  ) -> tuple[int, list[tuple[str, str]]]:
        async with self.read_engine.connect() as conn:
            count = await conn.scalar(select(func.count()).select_from(t.establishments))
            misplaced = [(str(s), str(u)) for s, u in await conn.execute(
                select(t.establishments.c.slug, t.users.c.username)
                .join(t.users, t.users.c.establishment_id == t.establishments.c.id)
                .where(t.users.c.role == "operator",
                       t.users.c.establishment_id != operators_establishment)
                .order_by(t.establishments.c.slug, t.users.c.username))]
            return int(count or 0), misplaced

    async def newest_activity(self) -> float | None:
        m, a = t.messages.c, t.attempts.c
        async with self.read_engine.connect() as conn:
            # The newest rows by key (time-ordered ids): no scan of the history.
            times = [
                (await conn.execute(select(m.created_at).order_by(m.id.desc()).limit(1)))
                .scalar(),
                (await conn.execute(select(a.started_at).order_by(a.id.desc()).limit(1)))
                .scalar(),
            ]
        found = [float(x) for x in times if x is not None]
        return max(found) if found else None

    # -- the queue page ------------------------------------------------------------------
    async def activity_by_hour(self, establishment_id: int, start: float,
                               outcomes: Sequence[str]) -> list[tuple[int, str, int]]:
        a, m = t.attempts, t.messages
        offset = (a.c.started_at - cast(start, Float)) / 3600
        hour = (cast(offset, Integer) if self.read_engine.dialect.name == "sqlite"
                else cast(func.floor(offset), Integer))
        inner = (
            select(hour.label("h"), a.c.outcome.label("outcome"))
            .select_from(a.join(m, m.c.id == a.c.message_id))
            .where(m.c.establishment_id == establishment_id, a.c.started_at >= start,
                   a.c.outcome.in_(outcomes))
            .subquery()
        )
        stmt = (select(inner.c.h, inner.c.outcome, func.count())
                .group_by(inner.c.h, inner.c.outcome))
        async with self.read_engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [(int(h), str(outcome), int(n)) for h, outcome, n in rows]

    async def search_messages(
        self, establishment_id: int, *, status: str | None = None, sender: str | None = None,
        recipient: str | None = None, since: float | None = None, until: float | None = None,
        limit: int = 200,
    ) -> list[MessageRow]:
        m, r = t.messages, t.recipients
        conditions: list[Any] = [m.c.establishment_id == establishment_id]
        if status:
            conditions.append(m.c.status == status)
        if sender:
            conditions.append(or_(m.c.header_from.icontains(sender, autoescape=True),
                                  m.c.envelope_from.icontains(sender, autoescape=True)))
        if recipient:
            conditions.append(exists(
                select(r.c.message_id).where(
                    r.c.message_id == m.c.id,
                    r.c.address.icontains(recipient, autoescape=True),
                )
            ))
        if since is not None:
            conditions.append(m.c.created_at >= since)
        if until is not None:
            conditions.append(m.c.created_at < until)
        stmt = (
            select(m.c.id, m.c.status, m.c.subject, m.c.header_from, m.c.envelope_from,
                   m.c.created_at, m.c.updated_at, m.c.next_attempt_at, m.c.attempts,
                   m.c.last_error)
            .where(and_(*conditions))
            .order_by(m.c.created_at.desc(), m.c.id.desc())
            .limit(limit)
        )
        async with self.read_engine.connect() as conn:
            rows = [MessageRow(x.id, x.status, x.subject, x.header_from, x.envelope_from,
                               x.created_at, x.updated_at, x.next_attempt_at, x.attempts,
                               x.last_error)
                    for x in (await conn.execute(stmt)).all()]
            if rows:
                by_id = {row.id: row for row in rows}
                rstmt = (select(r.c.message_id, r.c.address)
                         .where(r.c.message_id.in_(list(by_id)))
                         .order_by(r.c.message_id, r.c.position))
                for mid, address in (await conn.execute(rstmt)).all():
                    by_id[mid].recipients.append(address)
        return rows
