"""The SQL of the relays' shared state: sending limits and pauses, the failing state
behind failover and alerts, and the connection slots with their line of waiters
(:class:`postier.store.relays.RelayStore`)."""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from postier.store import schema as t
from postier.store.records import (
    WAITER_STALE,
    RelayGrant,
    RelayHealth,
    RelayLimits,
    RelayPause,
)
from postier.store.sql_base import SQLBase, _translate


@dataclass
class _Waiter:
    """A holder waiting for one of a relay's connection slots for an establishment's
    e-mail, in the ``relay_waiters`` line (see ``Store.take_relay_slot``)."""

    relay_key: str
    holder: str
    establishment_id: int
    now: float
    since: float | None = None  # its place in the line, None when not in it yet
    seen_at: float = 0.0

    async def ahead(self, conn: AsyncConnection, held: collections.Counter[int]) -> int:
        """How many live waiters come before this one: their establishment holds fewer
        slots, or as many and they wait longer. Forgets the lapsed ones."""
        w = t.relay_waiters.c
        rows = (await conn.execute(select(w.holder, w.establishment_id, w.since, w.seen_at)
                                   .where(w.relay_key == self.relay_key))).all()
        if not rows:
            return 0
        if any(r.seen_at < self.now - WAITER_STALE for r in rows):
            await conn.execute(delete(t.relay_waiters).where(
                w.relay_key == self.relay_key, w.seen_at < self.now - WAITER_STALE))
        others = []
        for r in rows:
            if r.holder == self.holder and r.establishment_id == self.establishment_id:
                self.since, self.seen_at = float(r.since), float(r.seen_at)
            elif r.seen_at >= self.now - WAITER_STALE:
                others.append((held[int(r.establishment_id)], float(r.since)))
        mine = (held[self.establishment_id],
                self.since if self.since is not None else self.now)
        return sum(1 for rank in others if rank < mine)

    async def wait(self, conn: AsyncConnection, dialect: Any) -> None:
        """Noted as waiting (keeping its place when it was already)."""
        w = t.relay_waiters.c
        if self.since is not None:
            if self.now - self.seen_at < WAITER_STALE / 3:
                return  # seen lately enough: no write at each ask
            await conn.execute(update(t.relay_waiters).where(
                w.relay_key == self.relay_key, w.holder == self.holder,
                w.establishment_id == self.establishment_id).values(seen_at=self.now))
            return
        await conn.execute(dialect.insert(t.relay_waiters).values(
            relay_key=self.relay_key, holder=self.holder,
            establishment_id=self.establishment_id, since=self.now, seen_at=self.now,
        ).on_conflict_do_update(index_elements=["relay_key", "holder", "establishment_id"],
                                set_={"seen_at": self.now}))

    async def done(self, conn: AsyncConnection) -> None:
        """Served: out of the line (only a write when it was in it)."""
        if self.since is None:
            return
        w = t.relay_waiters.c
        await conn.execute(delete(t.relay_waiters).where(
            w.relay_key == self.relay_key, w.holder == self.holder,
            w.establishment_id == self.establishment_id))


@dataclass
class _Windows:
    """A relay's sliding windows as one reservation sees them: ``h`` (its hour) and ``d``
    (its day), each with the length of its buckets (``spans``), how long a bucket counts
    (``reach``), its buckets (start, amount) oldest first, and what they hold (``used``,
    which the reservation adds to as it grants)."""

    now: float
    spans: dict[str, float]
    reach: dict[str, float]
    buckets: dict[str, list[tuple[float, int]]]
    used: dict[str, int]

    def reopens(self, kind: str, limit: int, need: int) -> float:
        """When enough of the oldest buckets have left the window for ``need`` more."""
        excess = self.used[kind] + need - limit
        for bucket, amount in self.buckets[kind]:
            excess -= amount
            if excess <= 0:
                return bucket + self.reach[kind]
        return self.now + self.reach[kind]  # only this reservation's own usage: a full window

class SQLRelays(SQLBase):
    """The relays' shared state, in SQL."""

    # -- relay sending limits ------------------------------------------------------------
    async def _relay_row(self, conn: AsyncConnection, relay_key: str, now: float) -> Any:
        """The relay's limits row, locked until the transaction ends (PostgreSQL; SQLite's
        writer holds the whole database already), created on first use."""
        stmt = (select(t.relay_limits).where(t.relay_limits.c.relay_key == relay_key)
                .with_for_update())
        row = (await conn.execute(stmt)).first()
        if row is None:
            await conn.execute(
                self._dialect().insert(t.relay_limits)
                .values(relay_key=relay_key, next_start=0.0, paused_until=0.0, pause=0.0,
                        updated_at=now)
                .on_conflict_do_nothing()
            )
            row = (await conn.execute(stmt)).one()
        return row

    async def reserve_relay(
        self, relay_key: str, limits: RelayLimits, recipients: Sequence[int], now: float,
        horizon: float,
    ) -> RelayGrant:
        async def job(conn: AsyncConnection) -> RelayGrant:
            return await self._reserve(conn, relay_key, limits, list(recipients), now, horizon)

        result: RelayGrant = await self.write(job)
        return result

    async def _reserve(
        self, conn: AsyncConnection, key: str, limits: RelayLimits, recipients: list[int],
        now: float, horizon: float,
    ) -> RelayGrant:
        row = await self._relay_row(conn, key, now)
        n = len(recipients)
        if row.paused_until > now:
            return RelayGrant([None] * n, ["pause"] * n, [row.paused_until] * n,
                              row.paused_until, row.pause, row.pause_error)
        windows = await self._windows(conn, key, limits, now)
        used = windows.used
        interval = 60.0 / limits.per_minute if limits.per_minute else 0.0
        next_start = max(row.next_start, now)
        starts: list[float | None] = []
        blocked: list[str | None] = []
        resume: list[float] = []
        granted = {"h": 0, "d": 0}
        stop: tuple[str, float] | None = None  # pace and hour: first come, first served
        for count in recipients:
            refusal: tuple[str, float] | None = stop
            if refusal is None and limits.per_minute and next_start > now + horizon:
                refusal = stop = ("minute", next_start - horizon)
            if refusal is None and limits.per_hour and used["h"] + 1 > limits.per_hour:
                refusal = stop = ("hour", windows.reopens("h", limits.per_hour, 1))
            if (refusal is None and limits.recipients_per_day and used["d"] > 0
                    and used["d"] + count > limits.recipients_per_day):
                # A single e-mail with more recipients than a whole day's limit goes
                # alone into an empty day rather than never.
                need = min(count, limits.recipients_per_day)
                refusal = ("day", windows.reopens("d", limits.recipients_per_day, need))
            if refusal is not None:
                starts.append(None)
                blocked.append(refusal[0])
                resume.append(refusal[1])
                continue
            starts.append(next_start if interval else now)
            blocked.append(None)
            resume.append(0.0)
            if interval:
                next_start += interval
            used["h"] += 1
            used["d"] += count
            granted["h"] += 1
            granted["d"] += count
        await self._count_granted(conn, key, windows, granted)
        if interval and granted["h"]:
            await conn.execute(
                update(t.relay_limits).where(t.relay_limits.c.relay_key == key)
                .values(next_start=next_start, updated_at=now)
            )
        return RelayGrant(starts, blocked, resume, row.paused_until, row.pause,
                          row.pause_error)

    async def _windows(self, conn: AsyncConnection, key: str, limits: RelayLimits,
                       now: float) -> _Windows:
        """The relay's hour and day windows as they stand (expired buckets deleted)."""
        u = t.relay_usage.c
        # Sliding windows out of buckets of 1/24 of the window: a bucket counts until every
        # e-mail it may hold has left the window, so no window of that length ever holds
        # more than the limit.
        spans = {"h": limits.hour / 24, "d": limits.day / 24}
        reach = {"h": limits.hour + spans["h"], "d": limits.day + spans["d"]}
        await conn.execute(delete(t.relay_usage).where(
            u.relay_key == key,
            ((u.kind == "h") & (u.bucket <= now - reach["h"]))
            | ((u.kind == "d") & (u.bucket <= now - reach["d"])),
        ))
        buckets: dict[str, list[tuple[float, int]]] = {"h": [], "d": []}
        for b in await conn.execute(
            select(u.kind, u.bucket, u.amount).where(u.relay_key == key).order_by(u.bucket)
        ):
            if b.kind in buckets:
                buckets[b.kind].append((float(b.bucket), int(b.amount)))
        used = {k: sum(a for _, a in v) for k, v in buckets.items()}
        return _Windows(now, spans, reach, buckets, used)

    async def _count_granted(self, conn: AsyncConnection, key: str, windows: _Windows,
                             granted: dict[str, int]) -> None:
        """Count what was granted in the current bucket of each window."""
        u = t.relay_usage.c
        for kind, amount in granted.items():
            if not amount:
                continue
            span = windows.spans[kind]
            bucket = math.floor(windows.now / span) * span
            res = await conn.execute(
                update(t.relay_usage)
                .where(u.relay_key == key, u.kind == kind, u.bucket == bucket)
                .values(amount=u.amount + amount)
            )
            if res.rowcount == 0:
                await conn.execute(insert(t.relay_usage).values(
                    relay_key=key, kind=kind, bucket=bucket, amount=amount))

    async def relay_pause(self, relay_key: str) -> RelayPause | None:
        rows = await self._read(
            select(t.relay_limits).where(t.relay_limits.c.relay_key == relay_key)
        )
        if not rows:
            return None
        return RelayPause(rows[0].paused_until, rows[0].pause, rows[0].pause_error)

    async def pause_relay(
        self, relay_key: str, now: float, pause: float, max_pause: float, error: str
    ) -> RelayPause:
        async def job(conn: AsyncConnection) -> RelayPause:
            row = await self._relay_row(conn, relay_key, now)
            length = row.pause or pause
            until, following = row.paused_until, row.pause
            if now >= row.paused_until:
                # Workers that saw the same reply together pause it once, not each.
                until, following = now + length, min(length * 2, max(max_pause, pause))
            await conn.execute(
                update(t.relay_limits).where(t.relay_limits.c.relay_key == relay_key)
                .values(paused_until=until, pause=following, pause_error=error,
                        updated_at=now)
            )
            return RelayPause(until, following, error)

        result: RelayPause = await self.write(job)
        return result

    async def relay_recovered(self, relay_key: str) -> None:
        async def job(conn: AsyncConnection) -> None:
            await conn.execute(
                update(t.relay_limits)
                .where(t.relay_limits.c.relay_key == relay_key, t.relay_limits.c.pause != 0)
                .values(pause=0.0, updated_at=time.time())
            )

        await self.write(job)

    # -- a relay's failing state, shared (failover, alerts) -------------------------------
    async def relay_health(self, relay_key: str, now: float, waiters_of: str | None = None,
                           holder: str = "") -> RelayHealth:
        lim, w = t.relay_limits.c, t.relay_waiters.c
        try:
            async with self.read_engine.connect() as conn:
                row = (await conn.execute(select(lim.failing_since, lim.recovered_at)
                                          .where(lim.relay_key == relay_key))).first()
                waiting: frozenset[int] = frozenset()
                if waiters_of is not None:
                    waiting = frozenset(int(r[0]) for r in await conn.execute(
                        select(w.establishment_id).distinct()
                        .where(w.relay_key == waiters_of, w.holder != holder,
                               w.seen_at >= now - WAITER_STALE)))
        except Exception as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        if row is None:
            return RelayHealth(waiting=waiting)
        return RelayHealth(row.failing_since, row.recovered_at, waiting)

    async def relay_failing(self, relay_key: str, now: float) -> float:
        async def job(conn: AsyncConnection) -> float:
            row = await self._relay_row(conn, relay_key, now)
            if row.failing_since is not None:
                return float(row.failing_since)
            await conn.execute(update(t.relay_limits)
                               .where(t.relay_limits.c.relay_key == relay_key)
                               .values(failing_since=now, updated_at=now))
            return now

        result: float = await self.write(job)
        return result

    async def relay_answered(self, relay_key: str, now: float) -> bool:
        lim = t.relay_limits.c

        async def job(conn: AsyncConnection) -> bool:
            res = await conn.execute(
                update(t.relay_limits)
                .where(lim.relay_key == relay_key, lim.failing_since.is_not(None))
                .values(failing_since=None, recovered_at=now, updated_at=now))
            return bool(res.rowcount)

        result: bool = await self.write(job)
        return result

    async def claim_relay_probe(self, relay_key: str, now: float, every: float) -> bool:
        lim = t.relay_limits.c

        async def job(conn: AsyncConnection) -> bool:
            await self._relay_row(conn, relay_key, now)
            res = await conn.execute(
                update(t.relay_limits)
                .where(lim.relay_key == relay_key, lim.probed_at <= now - every)
                .values(probed_at=now))
            return bool(res.rowcount)

        result: bool = await self.write(job)
        return result

    # -- a relay's connection slots (max_connections) ------------------------------------
    async def take_relay_slot(
        self, relay_key: str, max_connections: int, holder: str, now: float,
        lease_seconds: float, establishment_id: int = 0, *, queue: bool = False,
    ) -> int | None:
        rl = t.relay_leases.c

        async def job(conn: AsyncConnection) -> int | None:
            rows = (await conn.execute(
                select(rl.slot, rl.expires_at, rl.establishment_id)
                .where(rl.relay_key == relay_key))).all()
            live = [r for r in rows if r.expires_at > now]
            free = max_connections - len(live)
            waiter = _Waiter(relay_key, holder, establishment_id, now)
            if queue:
                held = collections.Counter(int(r.establishment_id) for r in live)
                free -= await waiter.ahead(conn, held)
            if free <= 0:
                if queue:
                    await waiter.wait(conn, self._dialect())
                return None
            slot = await self._take_free_slot(
                conn, relay_key, max_connections, holder, now, lease_seconds,
                establishment_id, {int(r.slot): r.expires_at > now for r in rows})
            if queue:
                await (waiter.done(conn) if slot is not None
                       else waiter.wait(conn, self._dialect()))
            return slot

        result: int | None = await self.write(job)
        return result

    async def _take_free_slot(
        self, conn: AsyncConnection, relay_key: str, max_connections: int, holder: str,
        now: float, lease_seconds: float, establishment_id: int, rows: dict[int, bool],
    ) -> int | None:
        """A slot not held (``rows``: the slots with a row, whether its lease is live)."""
        rl = t.relay_leases.c
        until = now + lease_seconds
        for slot in range(max_connections):
            if rows.get(slot):
                continue
            if slot in rows:
                # A dead holder's slot. The condition is checked again under the row
                # lock (PostgreSQL), so of two workers taking it over, one gets it.
                res = await conn.execute(
                    update(t.relay_leases)
                    .where(rl.relay_key == relay_key, rl.slot == slot, rl.expires_at <= now)
                    .values(holder=holder, expires_at=until,
                            establishment_id=establishment_id))
            else:
                res = await conn.execute(
                    self._dialect().insert(t.relay_leases)
                    .values(relay_key=relay_key, slot=slot, holder=holder,
                            expires_at=until, establishment_id=establishment_id)
                    .on_conflict_do_nothing())
            if res.rowcount == 1:
                return slot
        return None  # every free slot was taken meanwhile by other workers

    async def renew_relay_slots(
        self, holder: str, slots: Collection[tuple[str, int]], now: float,
        lease_seconds: float,
    ) -> set[tuple[str, int]]:
        rl = t.relay_leases.c
        by_relay: dict[str, list[int]] = {}
        for key, slot in slots:
            by_relay.setdefault(key, []).append(slot)

        async def job(conn: AsyncConnection) -> set[tuple[str, int]]:
            held: set[tuple[str, int]] = set()
            for key, numbers in by_relay.items():
                where = (rl.holder == holder, rl.relay_key == key, rl.slot.in_(numbers))
                await conn.execute(update(t.relay_leases).where(*where)
                                   .values(expires_at=now + lease_seconds))
                held.update((key, int(r.slot))
                            for r in await conn.execute(select(rl.slot).where(*where)))
            return held

        result: set[tuple[str, int]] = await self.write(job)
        return result

    async def release_relay_slot(self, relay_key: str, slot: int, holder: str,
                                 handed_round: float | None = None) -> None:
        rl, w = t.relay_leases.c, t.relay_waiters.c

        async def job(conn: AsyncConnection) -> None:
            await conn.execute(delete(t.relay_leases).where(
                rl.relay_key == relay_key, rl.slot == slot, rl.holder == holder))
            if handed_round is not None:
                # Given up for the others: this holder's own waits queue behind theirs.
                await conn.execute(update(t.relay_waiters)
                                   .where(w.relay_key == relay_key, w.holder == holder)
                                   .values(since=handed_round))

        await self.write(job)
