"""The PostgreSQL store's acceptance, against a real PostgreSQL.

- Concurrent acceptances are written by one statement: every column, body and recipient
  lands as given, and workers listening elsewhere are woken once it is committed.
- Pooled connections are not tested at every use (SQLAlchemy's ``pool_pre_ping`` cost
  three round trips each time); one idle long enough is, so connections the database
  dropped while the server was quiet (a restart, a failover) are replaced without the
  next e-mail being refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from postier.store import create_store, database_url
from postier.store import postgres as pg_module
from postier.store.base import AttemptRecord, NewMessage, Outcome, RecipientState
from postier.store.postgres import PostgresStore

pytestmark = pytest.mark.postgres


def _message(n: int, **kw: object) -> NewMessage:
    fields: dict[str, object] = dict(
        id=f"{time.time_ns():020d}{n:012d}", establishment_id=1 + n % 2, user_id=10 + n,
        priority=n % 3, envelope_from=f"prof{n}@ac-lyon.fr",
        header_from=f"Professeur {n} <prof{n}@ac-lyon.fr>", message_id=f"<m{n}@ac-lyon.fr>",
        subject=f"Conseil de classe {n}", data=f"Subject: {n}\r\n\r\nCorps {n}\r\n".encode(),
        recipients=[f"parent{n}.{i}@example.org" for i in range(n % 3 + 1)])
    fields.update(kw)
    return NewMessage(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def store(pg_url: str, tmp_path: Path) -> AsyncIterator[PostgresStore]:
    s = create_store(database_url(tmp_path, pg_url))
    assert isinstance(s, PostgresStore)
    await s.open()
    yield s
    await s.close()


async def test_concurrent_acceptances_are_stored_whole_and_wake_listeners(
    store: PostgresStore, pg_url: str
) -> None:
    woken = asyncio.Event()
    listener = await asyncpg.connect(pg_url)
    await listener.add_listener(pg_module.CHANNEL, lambda *_: woken.set())
    try:
        sent = [_message(1), _message(2, smtputf8=True, idempotency_key="clé-2",
                                      sender_rule="rewritten"), _message(3)]
        before = time.time()
        results = await asyncio.gather(*(store.enqueue([m]) for m in sent))
        assert [r[0].id for r in results] == [m.id for m in sent]
        assert [r[0].status for r in results] == ["queued"] * 3
        await asyncio.wait_for(woken.wait(), 5)

        rows = {r["id"]: r for r in await listener.fetch(
            "SELECT m.*, b.data FROM messages m JOIN message_bodies b ON b.message_id = m.id")}
        rcpts = await listener.fetch(
            "SELECT message_id, position, address, status FROM recipients"
            " ORDER BY message_id, position")
    finally:
        await listener.close()
    assert set(rows) == {m.id for m in sent}
    for m in sent:
        row = rows[m.id]
        assert (row["establishment_id"], row["user_id"], row["priority"], row["status"]) == (
            m.establishment_id, m.user_id, m.priority, "queued")
        assert (row["envelope_from"], row["header_from"], row["message_id"],
                row["subject"]) == (m.envelope_from, m.header_from, m.message_id, m.subject)
        assert (row["size"], row["smtputf8"], row["idempotency_key"], row["sender_rule"],
                row["attempts"]) == (len(m.data), m.smtputf8, m.idempotency_key,
                                     m.sender_rule, 0)
        assert bytes(row["data"]) == m.data
        assert before <= row["created_at"] == row["updated_at"] == row["next_attempt_at"]
        assert [(r["position"], r["address"], r["status"]) for r in rcpts
                if r["message_id"] == m.id] == [
            (i, a, "pending") for i, a in enumerate(m.recipients)]

    # The same idempotency key again gives the first e-mail back, nothing stored twice.
    again = await store.enqueue([_message(9, user_id=12, idempotency_key="clé-2")])
    assert (again[0].id, again[0].duplicate) == (sent[1].id, True)
    assert (await store.counts())["queued"] == 3


async def _cut_connections(pg_url: str) -> int:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        return len(rows)
    finally:
        await conn.close()


async def test_connections_dropped_while_idle_are_replaced_before_use(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_module, "IDLE_PING_SECONDS", 0.2)  # read when the store is made
    s = create_store(database_url(tmp_path, pg_url))
    await s.open()
    try:
        await s.enqueue([_message(1)])
        assert await _cut_connections(pg_url) >= 1  # as a database restart does
        await asyncio.sleep(0.3)
        result = await s.enqueue([_message(2)])
        assert result[0].status == "queued"
        assert (await s.counts())["queued"] == 2
    finally:
        await s.close()


async def _scans(pg_url: str) -> dict[str, tuple[int, int]]:
    """(sequential, index) scans of the queue's tables, once ended connections reported."""
    conn = await asyncpg.connect(pg_url)
    try:
        await asyncio.sleep(1.2)  # a connection that ends reports its counters at once
        rows = await conn.fetch(
            "SELECT relname, seq_scan, idx_scan FROM pg_stat_user_tables"
            " WHERE relname IN ('messages', 'recipients', 'message_bodies')")
    finally:
        await conn.close()
    return {r["relname"]: (r["seq_scan"], r["idx_scan"] or 0) for r in rows}


async def test_queue_writes_find_rows_by_key_on_a_queue_that_grew_from_empty(
    pg_url: str, tmp_path: Path
) -> None:
    # asyncpg prepares each statement and PostgreSQL plans it once for the connection:
    # planned on a new, near-empty queue, a group of delivery results found its
    # recipients by reading the whole table, and kept doing so as the queue grew (1.1 ms
    # a statement at 10,000 rows). The writing connections never choose a sequential scan.
    url = database_url(tmp_path, pg_url)
    s = create_store(url)
    await s.open()  # creates the tables: building their indexes reads them
    await s.close()
    before = await _scans(pg_url)
    s = create_store(url)
    await s.open()
    try:
        n = 0
        for group in [1] * 8 + [40] * 10:  # small groups first: the plans are made then
            stored = [_message(n + i) for i in range(group)]
            n += group
            await s.enqueue(stored)
            claimed = await s.claim("w1", group, 60.0, time.time())
            assert len(claimed) == group
            await s.record_outcomes("w1", [
                Outcome(c.id, "sent", 1, 0.0, None,
                        [RecipientState(r.position, r.address, "sent", 250, "2.0.0 OK")
                         for r in c.recipients],
                        AttemptRecord(time.time(), 5, "relay", "sent", 250, "OK"))
                for c in claimed])
    finally:
        await s.close()  # its connections end, and report their counters
    after = await _scans(pg_url)
    seq = {table: after[table][0] - before[table][0] for table in after}
    assert seq == {"messages": 0, "recipients": 0, "message_bodies": 0}
    assert all(after[table][1] > before[table][1] for table in after)  # by index
