"""The SQL of the queue's hot paths: acceptance, claims under a lease, lease renewal and
release, delivery results, and the submission pace
(:class:`postier.store.queue.QueueStore`; reading and administering e-mails are in
:mod:`postier.store.sql_messages`).

The delivery path's statements (claim, results, lease renewal) run for every e-mail
delivered: they are written for the driver itself (``exec_driver_sql``) rather than built
as Core statements at each call, then looked up in the compiled cache and bound row by row
through SQLAlchemy's parameter processing, which cost several times their CPU. ``?``
stands for each parameter (see ``_driver_sql``); the statuses are written into the text,
which the queue's partial indexes need (see ``_constant``). The PostgreSQL backend
replaces the multi-statement ones with one statement each (:mod:`postier.store.postgres`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from postier.store import schema as t
from postier.store.records import (
    DEFERRED,
    FAILED,
    PENDING,
    QUEUED,
    SENDING,
    SUPPRESSED,
    Claimed,
    EnqueueResult,
    NewMessage,
    Outcome,
    PaceAsk,
    PaceGrant,
    RecipientState,
)
from postier.store.sql_base import SQLBase, _constant

# A claim looks at this many (establishment, priority) classes at least (more when it
# takes more e-mails): the cost of a claim is bounded whatever the number of
# establishments with e-mails waiting; the next claim goes on from where it stopped.
CLAIM_WALK_MIN = 32


@dataclass(frozen=True)
class ClaimAsk:
    """One claim's parameters, as the backends' claim statements take them."""

    worker_id: str
    limit: int
    lease_until: float
    now: float
    skip: tuple[int, ...]  # establishments to leave out of this claim
    cursor: int  # the round starts after this establishment
    walk: int  # at most this many (establishment, priority) classes looked at


def fair_order(due: Sequence[Any], walk: Sequence[int], limit: int) -> list[Any]:
    """Round-robin: every establishment's most urgent due e-mail, then every one's
    second, and so on, establishments in the order of the round (``walk``); ``due`` holds
    each establishment's rows in priority order, then by due time."""
    place = {e: i for i, e in reversed(list(enumerate(walk)))}
    rank: dict[int, int] = {}
    keyed = []
    for r in sorted(due, key=lambda r: (place[r.establishment_id], r.priority,
                                         r.next_attempt_at)):
        n = rank[r.establishment_id] = rank.get(r.establishment_id, 0) + 1
        keyed.append(((n, place[r.establishment_id]), r))
    keyed.sort(key=lambda k: k[0])
    return [r for _, r in keyed[:limit]]


class SQLQueue(SQLBase):
    """Acceptance and delivery of the queue's e-mails, in SQL."""

    # -- queue: acceptance ---------------------------------------------------------------
    async def enqueue(self, batch: Sequence[NewMessage]) -> list[EnqueueResult]:
        if not batch:
            return []
        result: list[EnqueueResult] = await self._merged(
            "enqueue", list(batch), self._insert_messages,
            whole_alone=self._insert_whole_alone,
        )
        return result

    # True where _insert_rows is one statement (PostgreSQL): see WriteJob. The idempotency
    # look-up before it is whole by itself too (a key inserted meanwhile by another
    # process fails the insert, and the e-mails go again, in a transaction).
    _insert_whole_alone = False

    async def _insert_messages(
        self, conn: AsyncConnection, items: list[NewMessage]
    ) -> list[EnqueueResult]:
        # Idempotency: a key already stored for this user returns the first message.
        existing: dict[tuple[int, str], tuple[str, str]] = {}
        keyed = [(m.user_id, m.idempotency_key) for m in items if m.idempotency_key]
        if keyed:
            users = {u for u, _ in keyed}
            keys = {k for _, k in keyed}
            rows = await conn.execute(
                select(
                    t.messages.c.user_id,
                    t.messages.c.idempotency_key,
                    t.messages.c.id,
                    t.messages.c.status,
                ).where(
                    t.messages.c.user_id.in_(users), t.messages.c.idempotency_key.in_(keys)
                )
            )
            for r in rows:
                existing[(r.user_id, r.idempotency_key)] = (r.id, r.status)

        now = time.time()
        results: list[EnqueueResult] = []
        msg_rows: list[tuple[Any, ...]] = []
        body_rows: list[tuple[Any, ...]] = []
        rcpt_rows: list[tuple[Any, ...]] = []
        for m in items:
            if m.idempotency_key:
                key = (m.user_id, m.idempotency_key)
                if key in existing:
                    first_id, status = existing[key]
                    results.append(EnqueueResult(first_id, status, True))
                    continue
                existing[key] = (m.id, QUEUED)
            # Recipients on the suppression list are never attempted; an e-mail with
            # only such recipients is final (failed) from the start.
            held = m.suppressed or {}
            status = FAILED if held and all(a in held for a in m.recipients) else QUEUED
            results.append(EnqueueResult(m.id, status, False))
            msg_rows.append((
                m.id, m.establishment_id, m.user_id, m.priority, m.envelope_from,
                m.header_from, m.message_id, m.subject, len(m.data), m.smtputf8,
                m.idempotency_key, m.sender_rule, status, now, now, now,
            ))
            body_rows.append((m.id, m.data))
            if held:
                rcpt_rows.extend((m.id, i, a, SUPPRESSED, held[a]) if a in held
                                 else (m.id, i, a, PENDING, None)
                                 for i, a in enumerate(m.recipients))
            else:
                rcpt_rows.extend((m.id, i, a, PENDING, None)
                                 for i, a in enumerate(m.recipients))
        if msg_rows:
            await self._insert_rows(conn, now, msg_rows, body_rows, rcpt_rows)
        return results

    async def _insert_rows(
        self,
        conn: AsyncConnection,
        now: float,
        msg_rows: list[tuple[Any, ...]],
        body_rows: list[tuple[Any, ...]],
        rcpt_rows: list[tuple[Any, ...]],
    ) -> None:
        """Store new e-mails: one row of ``msg_rows`` each (id, establishment, user,
        priority, envelope sender, From, Message-ID, subject, size, SMTPUTF8, idempotency
        key, sender rule, status, then ``now`` three times: created, updated, due), with
        their bodies (id, bytes) and recipients (id, position, address, status, reply)."""
        # Written for the driver, like the delivery path's statements below: built
        # once, bound as tuples, a good part less CPU an e-mail than Core statements.
        await conn.exec_driver_sql(self._sql(
            "INSERT INTO messages (id, establishment_id, user_id, priority,"
            " envelope_from, header_from, message_id, subject, size, smtputf8,"
            " idempotency_key, sender_rule, status, created_at, updated_at,"
            " next_attempt_at, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " ?, ?, 0)"
        ), msg_rows)
        await conn.exec_driver_sql(self._sql(
            "INSERT INTO message_bodies (message_id, data) VALUES (?, ?)"), body_rows)
        await conn.exec_driver_sql(self._sql(
            "INSERT INTO recipients (message_id, position, address, status, reply)"
            " VALUES (?, ?, ?, ?, ?)"), rcpt_rows)

    # -- queue: delivery -----------------------------------------------------------------
    async def claim(
        self, worker_id: str, limit: int, lease_seconds: float, now: float,
        skip_establishments: Collection[int] = (),
    ) -> list[Claimed]:
        ask = ClaimAsk(worker_id, limit, now + lease_seconds, now,
                       tuple(sorted(skip_establishments)), self._claim_cursor,
                       max(CLAIM_WALK_MIN, limit))

        async def job(conn: AsyncConnection) -> list[Claimed]:
            rows, bodies, rcpts, cursor = await self._claim_rows(conn, ask)
            self._claim_cursor = cursor
            if not rows:
                return []
            rows = sorted(rows, key=lambda r: (r.priority, r.next_attempt_at))
            claimed = []
            for r in rows:
                data = bodies.get(r.id)
                if data is None:
                    # A message without its body cannot be sent; fail it loudly rather than
                    # let it block the queue.
                    await conn.execute(
                        update(t.messages)
                        .where(t.messages.c.id == r.id)
                        .values(
                            status="failed",
                            last_error="message body missing from the store",
                            lease_owner=None,
                            lease_expires_at=None,
                        )
                    )
                    continue
                claimed.append(
                    Claimed(
                        id=r.id,
                        establishment_id=r.establishment_id,
                        user_id=r.user_id,
                        envelope_from=r.envelope_from,
                        data=bytes(data),
                        smtputf8=bool(r.smtputf8),
                        attempts=r.attempts,
                        created_at=r.created_at,
                        recipients=rcpts[r.id],
                        priority=r.priority,
                    )
                )
            return claimed

        job.whole_alone = self._claim_whole_alone  # type: ignore[attr-defined]
        result: list[Claimed] = await self.write(job)
        return result

    # True where _claim_rows is one statement (PostgreSQL): see WriteJob.
    _claim_whole_alone = False
    # Where the next claim's round of the establishments starts (this process's own: each
    # process goes round, and together they go round too).
    _claim_cursor = -1

    # The walk's probes, each an exact index range (SQLite does not seek an index on a
    # row-value comparison such as ``(establishment_id, priority) > (?, ?)``, it filters).
    _WALK_FIRST = ("SELECT establishment_id, priority FROM messages"
                   " WHERE status IN ('queued', 'deferred') AND {lap}"
                   " ORDER BY establishment_id, priority LIMIT 1")
    _WALK_SAME = ("SELECT establishment_id, priority FROM messages"
                  " WHERE status IN ('queued', 'deferred') AND establishment_id = ?"
                  " AND priority > ? ORDER BY priority LIMIT 1")
    _WALK_NEXT = ("SELECT establishment_id, priority FROM messages"
                  " WHERE status IN ('queued', 'deferred') AND {lap}"
                  " AND establishment_id > ? ORDER BY establishment_id, priority LIMIT 1")
    _DUE = ("SELECT id, establishment_id, priority, next_attempt_at FROM messages"
            " WHERE status IN ('queued', 'deferred') AND establishment_id = ?"
            " AND priority = ? AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?")

    async def _claim_walk(
        self, conn: AsyncConnection, ask: ClaimAsk, due: list[Any]
    ) -> list[tuple[int, int]]:
        """The (establishment, priority) classes that have e-mails waiting, in the round's
        order: after the cursor, then from the start up to it; at most ``ask.walk``. One
        index probe each, however many e-mails a class holds. The due e-mails of the
        classes found are added to ``due``, a statement for several classes at a time; the
        walk stops once ``ask.limit`` establishments have one due (the round's first turn
        alone fills the claim, so walking further would change nothing): a small claim
        among many establishments costs a few probes, not ``ask.walk``."""
        walk: list[tuple[int, int]] = []
        skip = set(ask.skip)
        serving: set[int] = set()
        found: list[tuple[int, int]] = []  # classes whose due e-mails are not read yet
        for lap in ("establishment_id > ?", "establishment_id <= ?"):
            last: tuple[int, int] | None = None
            while len(walk) < ask.walk and len(serving) < ask.limit:
                if len(found) >= min(ask.limit - len(serving), self._DUE_AT_ONCE):
                    await self._read_due(conn, ask, found, due, serving)
                    found = []
                    continue
                if last is None:
                    row = (await conn.exec_driver_sql(self._sql(
                        self._WALK_FIRST.format(lap=lap)), (ask.cursor,))).first()
                else:
                    # The establishment's next class, else the next establishment's first.
                    row = (await conn.exec_driver_sql(self._sql(
                        f"SELECT * FROM ({self._WALK_SAME}) UNION ALL"  # noqa: S608
                        f" SELECT * FROM ({self._WALK_NEXT.format(lap=lap)}) LIMIT 1"),
                        (*last, ask.cursor, last[0]))).first()
                if row is None:
                    break
                last = (int(row.establishment_id), int(row.priority))
                walk.append(last)
                if last[0] not in skip:
                    found.append(last)
        if found:
            await self._read_due(conn, ask, found, due, serving)
        return walk

    # At most this many classes' due e-mails read by one statement.
    _DUE_AT_ONCE = 64

    async def _read_due(
        self, conn: AsyncConnection, ask: ClaimAsk, classes: list[tuple[int, int]],
        due: list[Any], serving: set[int],
    ) -> None:
        """Add the due e-mails of ``classes`` to ``due`` (one index range each, in one
        statement), and their establishments to ``serving``."""
        statement = " UNION ALL ".join(f"SELECT * FROM ({self._DUE})"  # noqa: S608
                                       for _ in classes)
        params = [p for c in classes for p in (*c, ask.now, ask.limit)]
        for r in await conn.exec_driver_sql(self._sql(statement), tuple(params)):
            due.append(r)
            serving.add(int(r.establishment_id))

    async def _claim_rows(
        self, conn: AsyncConnection, ask: ClaimAsk
    ) -> tuple[list[Any], dict[str, bytes], dict[str, list[RecipientState]], int]:
        """Claim, then read what delivery needs of the claimed e-mails: the claimed rows,
        their bodies and their recipients in order, by id, and the next claim's cursor.

        Each establishment's due e-mails in turn (round-robin), most urgent first within
        one: a flood of one establishment holds back no other's e-mail."""
        due: list[Any] = []
        walk = await self._claim_walk(conn, ask, due)
        cursor = walk[-1][0] if len(walk) >= ask.walk else ask.cursor
        picked = fair_order(due, [e for e, _ in walk], ask.limit)
        if not picked:
            return [], {}, {}, cursor
        if len(picked) >= ask.limit:
            cursor = picked[-1].establishment_id
        cond, params = self._in("id", [r.id for r in picked])
        rows = list((await conn.exec_driver_sql(self._sql(
            "UPDATE messages SET status = 'sending', lease_owner = ?, lease_expires_at = ?,"  # noqa: S608
            f" updated_at = ? WHERE {cond} RETURNING id, establishment_id, user_id,"
            " envelope_from, smtputf8, attempts, created_at, priority, next_attempt_at"),
            (ask.worker_id, ask.lease_until, ask.now, *params))).all())
        bodies, rcpts = await self._claimed_parts(conn, [r.id for r in rows])
        return rows, bodies, rcpts, cursor

    async def _claimed_parts(
        self, conn: AsyncConnection, ids: list[str]
    ) -> tuple[dict[str, bytes], dict[str, list[RecipientState]]]:
        """The bodies and the recipients (in order) of the claimed e-mails ``ids``."""
        if not ids:
            return {}, {}
        cond, params = self._in("message_id", ids)
        bodies = {
            r.message_id: r.data
            for r in await conn.exec_driver_sql(
                self._sql("SELECT message_id, data FROM message_bodies"  # noqa: S608
                          f" WHERE {cond}"),
                tuple(params),
            )
        }
        rcpts: dict[str, list[RecipientState]] = {i: [] for i in ids}
        for r in await conn.exec_driver_sql(
            self._sql("SELECT message_id, position, address, status, code, reply"  # noqa: S608
                      f" FROM recipients WHERE {cond}"
                      " ORDER BY message_id, position"),
            tuple(params),
        ):
            rcpts[r.message_id].append(
                RecipientState(r.position, r.address, r.status, r.code, r.reply)
            )
        return bodies, rcpts

    async def renew_leases(
        self, worker_id: str, ids: Sequence[str], lease_seconds: float, now: float
    ) -> set[str]:
        if not ids:
            return set()
        cond, params = self._in("id", list(ids))
        statement = self._sql(
            "UPDATE messages SET lease_expires_at = ? WHERE lease_owner = ?"  # noqa: S608
            f" AND {cond} RETURNING id"
        )

        async def job(conn: AsyncConnection) -> set[str]:
            rows = await conn.exec_driver_sql(
                statement, (now + lease_seconds, worker_id, *params))
            return {r.id for r in rows}

        held: set[str] = await self.write(job)
        return held

    async def release_expired_leases(self, now: float, *, everything: bool = False) -> int:
        expired = t.messages.c.status == _constant(SENDING)
        if not everything:
            expired = expired & (t.messages.c.lease_expires_at < now)
        return await self._give_back(expired, now)

    async def release_worker(self, worker_id: str) -> int:
        return await self._give_back(
            (t.messages.c.status == _constant(SENDING)) & (t.messages.c.lease_owner == worker_id),
            time.time(),
        )

    async def _give_back(self, which: Any, now: float) -> int:
        """The e-mails ``which`` selects back to the queue, due at ``now``."""
        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                update(t.messages)
                .where(which)
                .values(
                    status=DEFERRED,
                    lease_owner=None,
                    lease_expires_at=None,
                    next_attempt_at=now,
                    updated_at=now,
                )
            )
            return int(res.rowcount)

        result: int = await self.write(job)
        return result

    async def record_outcomes(self, worker_id: str, outcomes: Sequence[Outcome]) -> None:
        if not outcomes:
            return

        async def write_outcomes(conn: AsyncConnection, items: list[Outcome]) -> None:
            await self._write_outcomes(conn, worker_id, items)

        await self._merged(("outcomes", worker_id), list(outcomes), write_outcomes,
                           whole_alone=self._outcomes_whole_alone)

    # True where _write_outcomes is one statement (PostgreSQL): see WriteJob.
    _outcomes_whole_alone = False

    async def _write_outcomes(
        self, conn: AsyncConnection, worker_id: str, items: list[Outcome]
    ) -> None:
        """Every result of the group in three statements, each run over all its rows."""
        now = time.time()
        rcpt_rows = [
            (r.status, r.code, r.reply, now, o.message_id, r.position)
            for o in items
            for r in o.recipients
        ]
        if rcpt_rows:
            await conn.exec_driver_sql(self._sql(
                "UPDATE recipients SET status = ?, code = ?, reply = ?, updated_at = ?"
                " WHERE message_id = ? AND position = ?"
            ), rcpt_rows)
        await conn.exec_driver_sql(self._sql(
            "INSERT INTO attempts (message_id, started_at, duration_ms, relay, outcome, code,"
            " detail, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        ), [
            (o.message_id, o.attempt.started_at, o.attempt.duration_ms, o.attempt.relay,
             o.attempt.outcome, o.attempt.code, o.attempt.detail, o.attempt.reason)
            for o in items
        ])
        # Only the lease holder decides the message's status: if the lease was lost
        # (and the message taken by another worker), the recipients' results above
        # are still true, but the status belongs to the new holder.
        await conn.exec_driver_sql(self._sql(
            "UPDATE messages SET status = ?, attempts = ?, next_attempt_at = ?, last_error = ?,"
            " lease_owner = NULL, lease_expires_at = NULL, updated_at = ?"
            " WHERE id = ? AND lease_owner = ?"
        ), [
            (o.status, o.attempts, o.next_attempt_at, o.last_error, now, o.message_id,
             worker_id)
            for o in items
        ])

    async def reserve_pace(self, asks: Sequence[PaceAsk]) -> PaceGrant:
        # The same order in every process, so that two transactions lock rows alike.
        order = sorted(range(len(asks)), key=lambda i: (asks[i].scope, asks[i].span))

        async def job(conn: AsyncConnection) -> PaceGrant:
            return await self._reserve_pace(conn, [asks[i] for i in order], order)

        result: PaceGrant = await self.write(job)
        return result

    async def _reserve_pace(self, conn: AsyncConnection, asks: list[PaceAsk],
                            order: list[int]) -> PaceGrant:
        u = t.api_usage.c
        await conn.execute(self._dialect().insert(t.api_usage).values([
            {"scope": a.scope, "span": a.span, "bucket": a.bucket, "amount": 0} for a in asks
        ]).on_conflict_do_nothing())
        key = tuple_(u.scope, u.span, u.bucket)
        rows = await conn.execute(
            select(u.scope, u.span, u.amount)
            .where(key.in_([(a.scope, a.span, a.bucket) for a in asks]))
            .order_by(u.scope, u.span).with_for_update())
        used = {(r.scope, r.span): int(r.amount) for r in rows}
        granted = [0] * len(asks)
        for i, a in enumerate(asks):
            held = used[(a.scope, a.span)]
            if held + a.need > a.limit:
                return PaceGrant([0] * len(asks), refused=order[i], used=held)
            granted[order[i]] = max(a.need, min(a.want, a.limit - held))
        for i, a in enumerate(asks):
            await conn.execute(
                update(t.api_usage)
                .where(u.scope == a.scope, u.span == a.span, u.bucket == a.bucket)
                .values(amount=u.amount + granted[order[i]]))
            await conn.execute(delete(t.api_usage).where(
                u.scope == a.scope, u.span == a.span, u.bucket < a.bucket))
        return PaceGrant(granted)

