"""The SQL of bounces and the suppression list (:class:`postier.store.bounces.BounceStore`).

Writes go through the store's writer. Adding an address is one ``INSERT … ON CONFLICT DO
NOTHING`` on the (establishment, address) unique index, so two processes receiving bounces
for the same address add it once; marking a recipient ``bounced`` changes only a ``sent``
one, so a late or repeated report cannot undo a retry or a later state.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from postier.store import schema as t
from postier.store.bounces import BounceRecord, Suppression
from postier.store.records import BOUNCED, SENT
from postier.store.sql_base import SQLBase

DAY = 86400


def _entry(row: Any) -> Suppression:
    return Suppression(row.establishment_id, row.address, row.reason, row.code, row.status,
                       row.diagnostic, row.message_id, row.created_at, row.created_by)


class SQLBounces(SQLBase):
    """The suppression list and the bounces received, in SQL."""

    async def suppressed_keys(self, establishment_id: int) -> frozenset[str]:
        c = t.suppressions.c
        rows = await self._read(select(c.address_key).where(
            c.establishment_id == establishment_id))
        return frozenset(r.address_key for r in rows)

    async def suppressions_of(self, establishment_id: int, keys: Collection[str]
                              ) -> list[Suppression]:
        if not keys:
            return []
        c = t.suppressions.c
        return [_entry(r) for r in await self._read(select(t.suppressions).where(
            c.establishment_id == establishment_id, c.address_key.in_(list(keys))))]

    async def list_suppressions(self, establishment_id: int, *, search: str = "",
                                limit: int = 100, offset: int = 0
                                ) -> tuple[list[Suppression], int]:
        c = t.suppressions.c
        cond = c.establishment_id == establishment_id
        if search:
            cond = cond & c.address_key.contains(search.lower(), autoescape=True)
        rows = await self._read(select(t.suppressions).where(cond)
                                .order_by(c.created_at.desc(), c.id.desc())
                                .limit(limit).offset(offset))
        (total,) = await self._read(select(func.count()).select_from(t.suppressions)
                                    .where(cond))
        return [_entry(r) for r in rows], int(total[0])

    async def add_suppression(self, entry: Suppression) -> bool:
        c = t.suppressions.c

        async def job(conn: AsyncConnection) -> bool:
            stmt = self._dialect().insert(t.suppressions).values(
                establishment_id=entry.establishment_id, address=entry.address,
                address_key=entry.key, reason=entry.reason, code=entry.code,
                status=entry.status, diagnostic=entry.diagnostic,
                message_id=entry.message_id, created_at=entry.created_at,
                created_by=entry.created_by,
            ).on_conflict_do_nothing(index_elements=[c.establishment_id, c.address_key])
            return bool((await conn.execute(stmt)).rowcount)

        return bool(await self.write(job))

    async def remove_suppression(self, establishment_id: int, key: str
                                 ) -> Suppression | None:
        c = t.suppressions.c
        where = (c.establishment_id == establishment_id) & (c.address_key == key)

        async def job(conn: AsyncConnection) -> Suppression | None:
            row = (await conn.execute(select(t.suppressions).where(where))).first()
            if row is None:
                return None
            await conn.execute(delete(t.suppressions).where(where))
            return _entry(row)

        result: Suppression | None = await self.write(job)
        return result

    async def record_bounce(self, bounce: BounceRecord) -> None:
        async def job(conn: AsyncConnection) -> None:
            await conn.execute(insert(t.bounces).values(
                establishment_id=bounce.establishment_id, message_id=bounce.message_id,
                address_key=bounce.address.lower(), kind=bounce.kind, status=bounce.status,
                code=bounce.code, diagnostic=bounce.diagnostic,
                received_at=bounce.received_at))

        await self.write(job)

    async def mark_bounced(self, bounce: BounceRecord) -> bool:
        r = t.recipients.c

        async def job(conn: AsyncConnection) -> bool:
            res = await conn.execute(update(t.recipients).where(
                r.message_id == bounce.message_id,
                func.lower(r.address) == bounce.address.lower(), r.status == SENT,
            ).values(status=BOUNCED, code=bounce.code,
                     reply=" ".join(x for x in (bounce.status, bounce.diagnostic) if x),
                     updated_at=bounce.received_at))
            return bool(res.rowcount)

        return bool(await self.write(job))

    async def soft_bounce_days(self, establishment_id: int, key: str, since: float) -> int:
        b = t.bounces.c
        day = func.floor(b.received_at / DAY)
        rows = await self._read(select(func.count(day.distinct())).where(
            b.establishment_id == establishment_id, b.address_key == key,
            b.kind == "soft", b.received_at >= since))
        return int(rows[0][0] or 0)

    async def bounce_tallies(self) -> tuple[dict[tuple[int, str], int], dict[int, int]]:
        b, s = t.bounces.c, t.suppressions.c
        bounces = await self._read(select(b.establishment_id, b.kind, func.count())
                                   .group_by(b.establishment_id, b.kind))
        listed = await self._read(select(s.establishment_id, func.count())
                                  .group_by(s.establishment_id))
        return ({(int(e), str(k)): int(n) for e, k, n in bounces},
                {int(e): int(n) for e, n in listed})
