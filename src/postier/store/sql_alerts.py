"""The SQL of alerts: incidents and the webhook outbox
(:class:`postier.store.alerts.AlertStore`).

Both tables are written through the store's writer, like the queue. Opening an incident is
one ``INSERT … ON CONFLICT DO NOTHING`` against a partial unique index (one open incident
of a kind per establishment) and resolving it one ``UPDATE … WHERE resolved_at IS NULL``:
whichever process gets the row is the one that tells the administrators, so an incident is
announced once however many workers check it. The outbox's rows are taken for a moment
(``next_attempt_at`` moved forward) by the one process that posts them.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from postier.store import schema as t
from postier.store.alerts import DELIVERED, GAVE_UP, PENDING, Incident, OutgoingEvent
from postier.store.records import DEFERRED, QUEUED, SENDING
from postier.store.sql_base import SQLBase


def _incident(row: Any) -> Incident:
    return Incident(row.id, row.establishment_id, row.kind, row.started_at, row.resolved_at,
                    json.loads(row.details or "{}"))


class SQLAlerts(SQLBase):
    """Incidents and the webhook outbox, in SQL."""

    async def open_incident(self, establishment_id: int, kind: str, started_at: float,
                            details: dict[str, Any]) -> Incident | None:
        """Open an incident; ``None`` when one of that kind is already open (somebody else
        raised it)."""
        c = t.incidents.c

        async def job(conn: AsyncConnection) -> int | None:
            stmt = self._dialect().insert(t.incidents).values(
                establishment_id=establishment_id, kind=kind, started_at=started_at,
                resolved_at=None, details=json.dumps(details, sort_keys=True),
            ).on_conflict_do_nothing(
                index_elements=[c.establishment_id, c.kind],
                index_where=c.resolved_at.is_(None),
            ).returning(c.id)
            row = (await conn.execute(stmt)).first()
            return int(row.id) if row is not None else None

        new_id = await self.write(job)
        if new_id is None:
            return None
        return Incident(new_id, establishment_id, kind, started_at, None, details)

    async def resolve_incident(self, incident_id: int, at: float) -> bool:
        """Close an open incident; ``False`` when somebody else already did."""
        c = t.incidents.c

        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(update(t.incidents).where(
                c.id == incident_id, c.resolved_at.is_(None)).values(resolved_at=at))
            return int(res.rowcount)

        return bool(await self.write(job))

    async def open_incidents(self, establishment_id: int | None = None) -> list[Incident]:
        c = t.incidents.c
        query = select(t.incidents).where(c.resolved_at.is_(None))
        if establishment_id is not None:
            query = query.where(c.establishment_id == establishment_id)
        return [_incident(r) for r in await self._read(query.order_by(c.started_at))]

    async def list_incidents(self, establishment_id: int, limit: int = 100
                             ) -> list[Incident]:
        """The establishment's incidents, open ones first, then the most recent."""
        c = t.incidents.c
        rows = await self._read(
            select(t.incidents).where(c.establishment_id == establishment_id)
            .order_by(c.resolved_at.is_not(None), c.started_at.desc(), c.id.desc())
            .limit(limit)
        )
        return [_incident(r) for r in rows]

    async def last_resolved(self, establishment_id: int, kind: str) -> float | None:
        """When the latest incident of this kind ended."""
        c = t.incidents.c
        rows = await self._read(select(func.max(c.resolved_at)).where(
            c.establishment_id == establishment_id, c.kind == kind))
        return rows[0][0] if rows else None

    async def oldest_waiting(self) -> dict[int, tuple[float, int]]:
        """Per establishment: when its oldest e-mail still waiting was accepted, and how many
        wait. "Waiting" includes the e-mail being retried right now (``sending``) or made due
        again by an administrator (``queued``), so that a retry does not end the incident."""
        m = t.messages.c
        rows = await self._read(
            select(m.establishment_id, func.min(m.created_at), func.count())
            .where(m.status.in_((QUEUED, SENDING, DEFERRED))).group_by(m.establishment_id)
        )
        return {int(r[0]): (float(r[1]), int(r[2])) for r in rows}

    # -- the webhook outbox --------------------------------------------------------------
    async def add_event(self, establishment_id: int, event_id: str, event: str,
                        dedupe_key: str, payload: str, now: float) -> bool:
        """Store an event to post; ``False`` when an event with this key is already stored."""
        c = t.webhook_outbox.c

        async def job(conn: AsyncConnection) -> bool:
            stmt = self._dialect().insert(t.webhook_outbox).values(
                establishment_id=establishment_id, event_id=event_id, event=event,
                dedupe_key=dedupe_key[:200], payload=payload, status=PENDING, attempts=0,
                created_at=now, next_attempt_at=now,
            ).on_conflict_do_nothing(index_elements=[c.establishment_id, c.dedupe_key])
            return bool((await conn.execute(stmt)).rowcount)

        return bool(await self.write(job))

    async def take_due_events(self, now: float, hold: float, limit: int = 20
                              ) -> list[OutgoingEvent]:
        """Due events, each taken for ``hold`` seconds by this process (another process skips
        them meanwhile; if this one dies, they are due again after ``hold``)."""
        c = t.webhook_outbox.c
        rows = await self._read(
            select(t.webhook_outbox).where(c.status == PENDING, c.next_attempt_at <= now)
            .order_by(c.next_attempt_at, c.id).limit(limit)
        )
        taken: list[OutgoingEvent] = []
        for r in rows:
            async def job(conn: AsyncConnection, row_id: int = r.id,
                          due: float = r.next_attempt_at) -> int:
                res = await conn.execute(update(t.webhook_outbox).where(
                    c.id == row_id, c.status == PENDING, c.next_attempt_at == due,
                ).values(next_attempt_at=now + hold))
                return int(res.rowcount)

            if await self.write(job):
                taken.append(OutgoingEvent(r.id, r.establishment_id, r.event_id, r.event,
                                           r.payload, r.attempts, r.created_at))
        return taken

    async def event_done(self, row_id: int, *, delivered: bool, attempts: int,
                         next_at: float | None, error: str | None) -> None:
        """Record one posting: delivered, to be tried again at ``next_at``, or given up."""
        c = t.webhook_outbox.c
        values: dict[str, Any] = {"attempts": attempts, "last_error": error}
        if delivered:
            values.update(status=DELIVERED, delivered_at=time.time())
        elif next_at is None:
            values.update(status=GAVE_UP)
        else:
            values.update(next_attempt_at=next_at)

        async def job(conn: AsyncConnection) -> None:
            await conn.execute(update(t.webhook_outbox).where(c.id == row_id).values(**values))

        await self.write(job)

    async def list_events(self, establishment_id: int, limit: int = 100
                          ) -> list[dict[str, Any]]:
        c = t.webhook_outbox.c
        rows = await self._read(select(t.webhook_outbox).where(
            c.establishment_id == establishment_id).order_by(c.id.desc()).limit(limit))
        return [dict(r._mapping) for r in rows]
