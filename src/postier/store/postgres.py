"""The PostgreSQL backend: several server and worker processes, on several machines, share
one queue.

Claims take rows with ``FOR UPDATE SKIP LOCKED`` so workers never wait for each other nor
take the same message; an acceptance commits and sends ``NOTIFY postier_queue`` so idle
workers wake at once (polling stays as the fallback); leases are renewed by heartbeats and
expire when a worker dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from postier.core.aio import cancel_and_wait
from postier.core.outage import Outage
from postier.store.records import Outcome, RecipientState
from postier.store.sql import SQLStore
from postier.store.sql_base import WriteJob
from postier.store.sql_queue import ClaimAsk

log = logging.getLogger(__name__)
CHANNEL = "postier_queue"
# A pooled connection unused for this long is tested before it is handed out.
IDLE_PING_SECONDS = 1.0
# A new connection that is not made within this many seconds (a database host that no
# longer answers at all) fails, so the caller can say "try later" instead of hanging.
CONNECT_TIMEOUT = 10.0
# The LISTEN connection is checked this often: a database that went away without closing
# it (a network cut) is noticed, and the connection made again.
LISTEN_CHECK_SECONDS = 5.0


def _ping_idle_connections(engine: AsyncEngine, idle_for: float) -> None:
    """Test a pooled connection before use if it has been idle ``idle_for`` seconds or more,
    and replace it if the database no longer answers (a restart, a failover, a firewall
    that dropped it).

    SQLAlchemy's ``pool_pre_ping`` tests every connection at every checkout, which on
    asyncpg is three round trips (BEGIN, a query, ROLLBACK): under load it tripled the
    round trips of an acceptance. A connection returned a moment ago was working a moment
    ago; one cut since fails its transaction like one cut after a ping would.
    """
    sync = engine.sync_engine

    @event.listens_for(sync, "checkin")
    def _returned(dbapi_connection: Any, record: Any) -> None:
        record.info["postier_returned"] = time.monotonic()

    @event.listens_for(sync, "checkout")
    def _handed_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        returned = record.info.get("postier_returned")
        if returned is not None and time.monotonic() - returned < idle_for:
            return
        try:
            sync.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool drops this connection and hands out another (a new one if need be).
            raise sa_exc.DisconnectionError(f"idle connection lost: {exc}") from exc


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as columns, for ``unnest``: ``width`` empty lists when there are no rows."""
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


# The due e-mails of each class of the claim's walk, read locked, at most ``{limit}`` each.
_DUE = ("SELECT d.*, w.lap FROM walk w CROSS JOIN LATERAL"
        " (SELECT id, establishment_id, priority, next_attempt_at FROM messages"
        " WHERE status IN ('queued', 'deferred') AND establishment_id = w.e"
        " AND priority = w.p AND next_attempt_at <= $4 AND establishment_id <> ALL($8)"
        " ORDER BY next_attempt_at LIMIT {limit} FOR UPDATE SKIP LOCKED) d")


class PostgresStore(SQLStore):
    backend = "postgresql"

    def __init__(self, url: str) -> None:
        # Writes find their rows by key (an e-mail's id, its recipients' positions, the
        # due index): their connections never choose a sequential scan. Without this, a
        # statement first planned on a new, near-empty queue keeps that plan while the
        # queue grows (asyncpg prepares statements, and PostgreSQL plans a prepared
        # statement once, until the next ANALYZE): the recipients of each group of
        # delivery results were found by reading the whole table, a cost growing with the
        # queue (bench smtp_relay_pg). Reads keep the planner's free choice.
        write = create_async_engine(url, pool_size=5, max_overflow=10, connect_args={
            "server_settings": {"enable_seqscan": "off"}, "timeout": CONNECT_TIMEOUT})
        read = create_async_engine(url, pool_size=5, max_overflow=10,
                                   connect_args={"timeout": CONNECT_TIMEOUT})
        for engine in (write, read):
            _ping_idle_connections(engine, IDLE_PING_SECONDS)
        super().__init__(write, read, transaction=self._transaction)
        # Statements that commit by themselves, on the same pool.
        self._autocommit = write.execution_options(isolation_level="AUTOCOMMIT")
        self._listen_conn: AsyncConnection | None = None
        self.listen_task: asyncio.Task[None] | None = None

    # New e-mails, their bodies and recipients in one statement, column by column, with
    # the NOTIFY that wakes workers on other machines once it is committed: one round
    # trip instead of four, and with no BEGIN and COMMIT (see _transaction).
    _insert_whole_alone = True
    _INSERT_ROWS = (
        "WITH m AS (INSERT INTO messages (id, establishment_id, user_id, status, priority,"  # noqa: S608 (CHANNEL is a constant)
        " envelope_from, header_from, message_id, subject, size, smtputf8,"
        " idempotency_key, sender_rule, created_at, updated_at, next_attempt_at, attempts)"
        " SELECT u.id, u.est, u.usr, u.status, u.prio, u.env, u.hdr, u.mid, u.subj,"
        " u.size, u.utf8, u.ikey, u.rule, $14, $14, $14, 0"
        " FROM unnest($1::text[], $2::int[], $3::int[], $4::int[], $5::text[],"
        " $6::text[], $7::text[], $8::text[], $9::int[], $10::bool[], $11::text[],"
        " $12::text[], $13::text[]) AS u(id, est, usr, prio, env, hdr, mid, subj, size,"
        " utf8, ikey, rule, status)),"
        " b AS (INSERT INTO message_bodies (message_id, data)"
        " SELECT * FROM unnest($1::text[], $15::bytea[])),"
        " r AS (INSERT INTO recipients (message_id, position, address, status, reply)"
        " SELECT * FROM unnest($16::text[], $17::int[], $18::text[], $19::text[],"
        " $20::text[]))"
        f" SELECT pg_notify('{CHANNEL}', '')"
    )

    async def _insert_rows(
        self,
        conn: AsyncConnection,
        now: float,
        msg_rows: list[tuple[Any, ...]],
        body_rows: list[tuple[Any, ...]],
        rcpt_rows: list[tuple[Any, ...]],
    ) -> None:
        await conn.exec_driver_sql(self._INSERT_ROWS, (
            *_columns(msg_rows, 16)[:13], now, [data for _, data in body_rows],
            *_columns(rcpt_rows, 5),
        ))

    # The claim and what delivery needs of the claimed e-mails in one statement: the
    # recipients of each as an array of rows, in order. One round trip instead of three,
    # and with no BEGIN and COMMIT (the claim is committed by itself; see _transaction).
    _claim_whole_alone = True
    # SQLStore._claim_rows in one statement. ``after`` and ``upto`` walk the
    # (establishment, priority) classes with e-mails waiting, one index probe each (a
    # loose index scan of ix_messages_due_establishment): after the cursor, then from the
    # start up to it. ``due`` takes each class's due e-mails in order, locked; competing
    # workers skip the rows another one is taking instead of waiting. ``picked`` ranks
    # them within their establishment (priority, then due time) and takes every
    # establishment's first, then every one's second...: round-robin.
    _CLAIM = (
        "WITH RECURSIVE"  # noqa: S608 (only _DUE and constant limits formatted in)
        " after(e, p, n) AS ((SELECT establishment_id, priority, 1 FROM messages"
        " WHERE status IN ('queued', 'deferred') AND establishment_id > $5"
        " ORDER BY establishment_id, priority LIMIT 1)"
        " UNION ALL SELECT x.establishment_id, x.priority, a.n + 1 FROM after a,"
        " LATERAL (SELECT establishment_id, priority FROM messages"
        " WHERE status IN ('queued', 'deferred') AND (establishment_id, priority) > (a.e, a.p)"
        " ORDER BY establishment_id, priority LIMIT 1) x WHERE a.n < $6),"
        " upto(e, p, n) AS ((SELECT establishment_id, priority, 1 FROM messages"
        " WHERE status IN ('queued', 'deferred') AND establishment_id <= $5"
        " ORDER BY establishment_id, priority LIMIT 1)"
        " UNION ALL SELECT x.establishment_id, x.priority, a.n + 1 FROM upto a,"
        " LATERAL (SELECT establishment_id, priority FROM messages"
        " WHERE status IN ('queued', 'deferred') AND establishment_id <= $5"
        " AND (establishment_id, priority) > (a.e, a.p)"
        " ORDER BY establishment_id, priority LIMIT 1) x WHERE a.n < $6),"
        " walk AS (SELECT e, p, lap, n FROM (SELECT e, p, 0 AS lap, n FROM after"
        " UNION ALL SELECT e, p, 1, n FROM upto) w ORDER BY lap, n LIMIT $6),"
        # Each class's due e-mails, read locked: first as many as the round takes from
        # each establishment when all have that many (cap), then, only if the round came
        # short of the limit, up to as many more as it lacked.
        " cap AS (SELECT ($7 + k - 1) / k AS c FROM (SELECT greatest(1, count(DISTINCT e))"
        " AS k FROM walk WHERE e <> ALL($8)) x),"
        f" due1 AS ({_DUE.format(limit='(SELECT c FROM cap)')}),"
        " short AS (SELECT coalesce($7 - sum(least(n, (SELECT c FROM cap))), $7) AS n"
        " FROM (SELECT count(*) AS n FROM due1 GROUP BY establishment_id) x),"
        f" due2 AS ({_DUE.format(limit='(SELECT c FROM cap) + (SELECT n FROM short)')}"
        " WHERE (SELECT n FROM short) > 0),"
        " due AS (SELECT * FROM due1 WHERE (SELECT n FROM short) <= 0"
        " UNION ALL SELECT * FROM due2),"
        " picked AS (SELECT id, rn, lap FROM (SELECT id, lap, establishment_id,"
        " row_number() OVER (PARTITION BY establishment_id"
        " ORDER BY priority, next_attempt_at) AS rn FROM due) r"
        " ORDER BY rn, lap, establishment_id LIMIT $7),"
        " c AS (UPDATE messages m SET status = 'sending', lease_owner = $1,"
        " lease_expires_at = $2, updated_at = $3 FROM picked"
        " WHERE m.id = picked.id RETURNING m.id, m.establishment_id, m.user_id,"
        " m.envelope_from, m.smtputf8, m.attempts, m.created_at, m.priority,"
        " m.next_attempt_at, picked.rn, picked.lap),"
        # One row even when nothing was claimed: where the walk stopped.
        " s AS (SELECT count(*) AS walked, (SELECT e FROM walk"
        " ORDER BY lap DESC, n DESC LIMIT 1) AS last_walked FROM walk)"
        " SELECT c.*, b.data, s.walked, s.last_walked,"
        " ARRAY(SELECT ROW(r.position, r.address, r.status, r.code, r.reply)"
        " FROM recipients r WHERE r.message_id = c.id ORDER BY r.position) AS rcpts"
        " FROM s LEFT JOIN c ON true LEFT JOIN message_bodies b ON b.message_id = c.id"
    )

    async def _claim_rows(
        self, conn: AsyncConnection, ask: ClaimAsk
    ) -> tuple[list[Any], dict[str, bytes], dict[str, list[RecipientState]], int]:
        found = (await conn.exec_driver_sql(self._CLAIM, (
            ask.worker_id, ask.lease_until, ask.now, ask.now, ask.cursor, ask.walk,
            ask.limit, list(ask.skip)))).all()
        cursor = ask.cursor
        if found[0].walked >= ask.walk:
            # The walk's bound cut the round short: the next claim goes on from there.
            cursor = int(found[0].last_walked)
        rows = [r for r in found if r.id is not None]
        if len(rows) >= ask.limit:
            cursor = max(rows, key=lambda r: (r.rn, r.lap, r.establishment_id)
                         ).establishment_id
        bodies = {r.id: r.data for r in rows if r.data is not None}
        rcpts = {r.id: [RecipientState(*x) for x in r.rcpts] for r in rows}
        return rows, bodies, rcpts, cursor

    # Every result of a group in one statement: recipients, attempts, then the e-mails
    # whose lease this worker still holds (see SQLStore._write_outcomes).
    _outcomes_whole_alone = True
    _WRITE_OUTCOMES = (
        "WITH r AS (UPDATE recipients AS x SET status = u.status, code = u.code,"
        " reply = u.reply, updated_at = $1"
        " FROM unnest($2::text[], $3::int[], $4::text[], $5::int[], $6::text[])"
        " AS u(id, pos, status, code, reply)"
        " WHERE x.message_id = u.id AND x.position = u.pos),"
        " a AS (INSERT INTO attempts (message_id, started_at, duration_ms, relay, outcome,"
        " code, detail, reason) SELECT * FROM unnest($7::text[], $8::float8[], $9::int[],"
        " $10::text[], $11::text[], $12::int[], $13::text[], $14::text[])),"
        " m AS (UPDATE messages AS x SET status = u.status, attempts = u.attempts,"
        " next_attempt_at = u.due, last_error = u.error, lease_owner = NULL,"
        " lease_expires_at = NULL, updated_at = $1"
        " FROM unnest($15::text[], $16::text[], $17::int[], $18::float8[], $19::text[])"
        " AS u(id, status, attempts, due, error)"
        " WHERE x.id = u.id AND x.lease_owner = $20)"
        " SELECT 1"
    )

    async def _write_outcomes(
        self, conn: AsyncConnection, worker_id: str, items: list[Outcome]
    ) -> None:
        rcpts = [(o.message_id, r.position, r.status, r.code, r.reply)
                 for o in items for r in o.recipients]
        tries = [(o.message_id, o.attempt.started_at, o.attempt.duration_ms, o.attempt.relay,
                  o.attempt.outcome, o.attempt.code, o.attempt.detail, o.attempt.reason)
                 for o in items]
        ends = [(o.message_id, o.status, o.attempts, o.next_attempt_at, o.last_error)
                for o in items]
        await conn.exec_driver_sql(self._WRITE_OUTCOMES, (
            time.time(), *_columns(rcpts, 5), *_columns(tries, 8), *_columns(ends, 5),
            worker_id,
        ))

    async def _transaction(self, jobs: list[WriteJob]) -> list[Any]:
        # A job alone whose statements are each whole (the acceptance, a claim, a group of
        # results: see WriteJob) needs no BEGIN and COMMIT: each statement is committed
        # whole, or not at all, by itself. One round trip instead of three.
        if len(jobs) == 1 and getattr(jobs[0], "whole_alone", False):
            async with self._autocommit.connect() as conn:
                return [await jobs[0](conn)]
        async with self.write_engine.begin() as conn:
            return [await job(conn) for job in jobs]

    async def listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever new messages are committed by any process, for as
        long as the store is open: the LISTEN connection is made again whenever it is
        lost (a database restart, a network cut), and ``callback`` called then for the
        notifications missed meanwhile."""
        self.listen_task = asyncio.create_task(self._keep_listening(callback),
                                               name="postier-listen")

    async def _keep_listening(self, callback: Callable[[], None]) -> None:
        outage = Outage("wake-ups (LISTEN)")
        first = True
        while True:
            try:
                lost = await self._listen_once(callback)
            except Exception as exc:
                await self._drop_listen_conn()
                await outage.pause(exc)
                continue
            if not first:
                callback()  # what was queued while the connection was down
            first = False
            outage.worked()
            await self._until_lost(lost)
            await self._drop_listen_conn()

    async def _listen_once(self, callback: Callable[[], None]) -> asyncio.Event:
        """A connection listening on CHANNEL; the event is set when it is lost."""
        conn = await self.write_engine.connect()
        self._listen_conn = conn
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        lost = asyncio.Event()

        def on_notify(*_: Any) -> None:
            callback()

        driver.add_termination_listener(lambda *_: lost.set())
        await driver.add_listener(CHANNEL, on_notify)
        return lost

    async def _until_lost(self, lost: asyncio.Event) -> None:
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), LISTEN_CHECK_SECONDS)
            if lost.is_set() or self._listen_conn is None:
                return
            try:
                raw = await self._listen_conn.get_raw_connection()
                driver = raw.driver_connection
                assert driver is not None
                await asyncio.wait_for(driver.execute("SELECT 1"), LISTEN_CHECK_SECONDS)
            except Exception:
                return

    async def _drop_listen_conn(self) -> None:
        conn, self._listen_conn = self._listen_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.invalidate(), 5)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)

    async def close(self) -> None:
        if self.listen_task is not None:
            await cancel_and_wait(self.listen_task)
            self.listen_task = None
        await self._drop_listen_conn()
        await super().close()
