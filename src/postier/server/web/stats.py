"""Read-only queries of the queue page that the store does not offer: delivery activity per
time bucket (the chart) and the filtered message list (status, sender, recipient, date).

Both read through the store's read engine with SQLAlchemy Core on the shared schema, so
they work on SQLite and PostgreSQL alike, and never write.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Float, Integer, and_, cast, exists, func, or_, select

from postier.store import schema as t
from postier.store.base import Store
from postier.store.sql import SQLStore

HOUR = 3600
# period key -> (number of buckets, bucket size: "hour" or "day")
PERIODS: dict[str, tuple[int, str]] = {"24h": (24, "hour"), "7d": (7, "day"),
                                       "30d": (30, "day")}
OUTCOMES = ("sent", "deferred", "failed")


@dataclass
class Bucket:
    start: float
    end: float
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Filters:
    status: str | None = None
    sender: str | None = None
    recipient: str | None = None
    since: float | None = None  # created at or after
    until: float | None = None  # created before


@dataclass
class Row:
    id: str
    status: str
    subject: str
    sender: str
    envelope_from: str
    created_at: float
    updated_at: float
    next_attempt_at: float
    attempts: int
    last_error: str | None
    recipients: list[str] = field(default_factory=list)


def _local_midnight(when: dt.datetime) -> dt.datetime:
    return when.replace(hour=0, minute=0, second=0, microsecond=0)


def buckets(period: str, now: float) -> list[Bucket]:
    """Hour buckets ending with the current hour, or local days ending with today."""
    n, size = PERIODS.get(period, PERIODS["24h"])
    if size == "hour":
        top = (int(now) // HOUR + 1) * HOUR
        return [Bucket(top - (n - i) * HOUR, top - (n - i - 1) * HOUR) for i in range(n)]
    today = _local_midnight(dt.datetime.fromtimestamp(now).astimezone())
    days = [today - dt.timedelta(days=n - 1 - i) for i in range(n + 1)]
    # Local midnights, recomputed through the time zone so a change of time is honoured.
    edges = [_local_midnight(d.replace(tzinfo=None)).astimezone().timestamp() for d in days]
    return [Bucket(edges[i], edges[i + 1]) for i in range(n)]


def _engine(store: Store) -> Any:
    return store.read_engine if isinstance(store, SQLStore) else None


async def activity(store: Store, establishment_id: int, period: str, now: float) -> list[Bucket]:
    """Delivery attempts of the establishment per bucket, by outcome (sent, deferred,
    failed): counted per hour in SQL, then gathered into the buckets."""
    out = buckets(period, now)
    engine = _engine(store)
    if engine is None or not out:
        return out
    start = out[0].start
    a, m = t.attempts, t.messages
    offset = (a.c.started_at - cast(start, Float)) / HOUR
    hour = (cast(offset, Integer) if engine.dialect.name == "sqlite"
            else cast(func.floor(offset), Integer))
    inner = (
        select(hour.label("h"), a.c.outcome.label("outcome"))
        .select_from(a.join(m, m.c.id == a.c.message_id))
        .where(m.c.establishment_id == establishment_id, a.c.started_at >= start,
               a.c.outcome.in_(OUTCOMES))
        .subquery()
    )
    stmt = select(inner.c.h, inner.c.outcome, func.count()).group_by(inner.c.h, inner.c.outcome)
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    for h, outcome, n in rows:
        moment = start + int(h) * HOUR + 1
        for b in out:
            if b.start <= moment < b.end:
                b.counts[str(outcome)] += int(n)
                break
    return out


async def search(
    store: Store, establishment_id: int, filters: Filters, limit: int = 200
) -> list[Row]:
    """The establishment's messages matching ``filters``, newest first."""
    engine = _engine(store)
    if engine is None:
        return []
    m, r = t.messages, t.recipients
    conditions: list[Any] = [m.c.establishment_id == establishment_id]
    if filters.status:
        conditions.append(m.c.status == filters.status)
    if filters.sender:
        conditions.append(or_(m.c.header_from.icontains(filters.sender, autoescape=True),
                              m.c.envelope_from.icontains(filters.sender, autoescape=True)))
    if filters.recipient:
        conditions.append(exists(
            select(r.c.message_id).where(
                r.c.message_id == m.c.id,
                r.c.address.icontains(filters.recipient, autoescape=True),
            )
        ))
    if filters.since is not None:
        conditions.append(m.c.created_at >= filters.since)
    if filters.until is not None:
        conditions.append(m.c.created_at < filters.until)
    stmt = (
        select(m.c.id, m.c.status, m.c.subject, m.c.header_from, m.c.envelope_from,
               m.c.created_at, m.c.updated_at, m.c.next_attempt_at, m.c.attempts,
               m.c.last_error)
        .where(and_(*conditions))
        .order_by(m.c.created_at.desc(), m.c.id.desc())
        .limit(limit)
    )
    async with engine.connect() as conn:
        rows = [Row(x.id, x.status, x.subject, x.header_from, x.envelope_from, x.created_at,
                    x.updated_at, x.next_attempt_at, x.attempts, x.last_error)
                for x in (await conn.execute(stmt)).all()]
        if rows:
            by_id = {row.id: row for row in rows}
            rstmt = (select(r.c.message_id, r.c.address)
                     .where(r.c.message_id.in_(list(by_id)))
                     .order_by(r.c.message_id, r.c.position))
            for mid, address in (await conn.execute(rstmt)).all():
                by_id[mid].recipients.append(address)
    return rows
