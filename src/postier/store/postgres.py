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

from postier.store.sql import SQLStore

log = logging.getLogger(__name__)
CHANNEL = "postier_queue"
# A pooled connection unused for this long is tested before it is handed out.
IDLE_PING_SECONDS = 1.0


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


class PostgresStore(SQLStore):
    def __init__(self, url: str) -> None:
        engine = create_async_engine(url, pool_size=5, max_overflow=10)
        _ping_idle_connections(engine, IDLE_PING_SECONDS)
        super().__init__(engine, engine)
        self._listener: Any = None
        self._listen_conn: AsyncConnection | None = None

    # Competing workers skip the rows another one is taking instead of waiting.
    _claim_lock = " FOR UPDATE SKIP LOCKED"

    # New e-mails, their bodies and recipients in one statement, column by column, with
    # the NOTIFY that wakes workers on other machines once it is committed: one round
    # trip instead of four.
    _INSERT_ROWS = (
        "WITH m AS (INSERT INTO messages (id, establishment_id, user_id, status, priority,"  # noqa: S608 (CHANNEL is a constant)
        " envelope_from, header_from, message_id, subject, size, smtputf8,"
        " idempotency_key, sender_rule, created_at, updated_at, next_attempt_at, attempts)"
        " SELECT u.id, u.est, u.usr, 'queued', u.prio, u.env, u.hdr, u.mid, u.subj,"
        " u.size, u.utf8, u.ikey, u.rule, $13, $13, $13, 0"
        " FROM unnest($1::text[], $2::int[], $3::int[], $4::int[], $5::text[],"
        " $6::text[], $7::text[], $8::text[], $9::int[], $10::bool[], $11::text[],"
        " $12::text[]) AS u(id, est, usr, prio, env, hdr, mid, subj, size, utf8, ikey,"
        " rule)),"
        " b AS (INSERT INTO message_bodies (message_id, data)"
        " SELECT * FROM unnest($1::text[], $14::bytea[])),"
        " r AS (INSERT INTO recipients (message_id, position, address, status)"
        " SELECT x.id, x.pos, x.addr, 'pending'"
        " FROM unnest($15::text[], $16::int[], $17::text[]) AS x(id, pos, addr))"
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
        columns = [list(c) for c in zip(*msg_rows, strict=True)][:12]
        rcpt_ids, positions, addresses = zip(*rcpt_rows, strict=True)
        await conn.exec_driver_sql(self._INSERT_ROWS, (
            *columns, now, [data for _, data in body_rows],
            list(rcpt_ids), list(positions), list(addresses),
        ))

    async def listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever new messages are committed by any process."""
        conn = await self.write_engine.connect()
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None

        def on_notify(*_: Any) -> None:
            callback()

        await driver.add_listener(CHANNEL, on_notify)
        self._listen_conn = conn
        self._listener = on_notify

    async def close(self) -> None:
        if self._listen_conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listen_conn.close(), 5)
            self._listen_conn = None
        await super().close()
