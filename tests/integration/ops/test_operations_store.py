"""Metrics, retention and the personal-data export on each storage backend (SQLite and
PostgreSQL): the same SQL must count, purge and export the same way on both."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import func, select, update

from postier.core.service import Postier
from postier.ops import metrics, retention
from postier.server.config import ServerConfig
from postier.store import schema as t
from postier.store.base import (
    AttemptRecord,
    NewMessage,
    Outcome,
    RecipientState,
)

DAY = 86400.0


def new(i: int, user_id: int) -> NewMessage:
    return NewMessage(
        id=f"{int(time.time() * 1000):012x}{i:020x}", establishment_id=1, user_id=user_id,
        priority=0, envelope_from="a@ac-lyon.fr", header_from="A <a@ac-lyon.fr>",
        message_id=f"<{i}@ac-lyon.fr>", subject=f"n°{i}", data=b"Subject: x\r\n\r\nbody\r\n",
        recipients=[f"r{i}@example.org"],
    )


async def deliver(core: Postier, outcome: dict[str, str]) -> None:
    """Claim everything due and record the given outcome for each message."""
    claimed = await core.store.claim("w", 100, 60, time.time())
    now = time.time()
    await core.store.record_outcomes("w", [
        Outcome(
            message_id=c.id, status=outcome[c.id], attempts=c.attempts + 1,
            next_attempt_at=now + 3600, last_error=None,
            recipients=[RecipientState(r.position, r.address,
                                       "pending" if outcome[c.id] == "deferred"
                                       else outcome[c.id], 250, "ok")
                        for r in c.recipients],
            attempt=AttemptRecord(now, 120, "relay:25", outcome[c.id],
                                  None if outcome[c.id] == "deferred" else 250, "x"),
        )
        for c in claimed
    ])


async def test_counters_purge_and_export(store_url: str, tmp_path: Path) -> None:
    core = Postier(ServerConfig(data_dir=tmp_path, database_url=store_url))
    await core.open()
    try:
        store = core.store
        alice = await core.add_user("alice", "alice@ac-lyon.fr")
        batch = [new(i, alice.id) for i in range(5)]
        await core.store.enqueue(batch)
        ids = [m.id for m in batch]
        await deliver(core, dict(zip(ids, ["sent", "sent", "failed", "deferred", "deferred"],
                                     strict=True)))
        await core.store.set_status(ids[4], "cancelled", from_statuses=("deferred",),
                                    now=time.time())

        collector = metrics.Collector(store)
        # Seen two minutes later, so that the rows are in the collector's cached base (the
        # test then changes their times, which real rows never do).
        snap = await collector.snapshot(now=time.time() + 120)
        assert snap.totals.accepted == {1: 5}
        assert snap.totals.outcomes == {(1, "sent"): 2, (1, "failed"): 1, (1, "deferred"): 2}
        assert snap.queue == {"queued": 0, "sending": 0, "deferred": 1}
        assert set(snap.relays) == {"relay:25"}
        assert sum(snap.totals.buckets) == 2
        text = metrics.render(snap)
        assert 'postier_messages_sent_total{establishment="default"} 2' in text

        # Made old: 40 days, then 400 days after they became final.
        async def age(days: float) -> None:
            then = time.time() - days * DAY

            async def job(conn: object) -> None:
                await conn.execute(  # type: ignore[attr-defined]
                    update(t.messages).values(created_at=then - 60, updated_at=then))

            await store.write(job)

        await age(40)
        dry = await retention.purge(core, dry_run=True)
        assert (dry.bodies, dry.messages) == (4, 0)
        done = await retention.purge(core)
        assert (done.bodies, done.messages) == (4, 0)
        data = await retention.user_data(core, alice)
        kept = {m["id"]: m["body_kept"] for m in data["messages"]}
        assert kept == {i: i == ids[3] for i in ids}

        await age(400)
        assert (await retention.purge(core, dry_run=True)).messages == 4
        done = await retention.purge(core, batch=3)  # two batches, one audit entry
        assert done.messages == 4
        async with store.read_engine.connect() as conn:
            left = [r for (r,) in await conn.execute(select(t.messages.c.id))]
            entries = (await conn.execute(select(func.count()).select_from(t.audit_log)
                                          .where(t.audit_log.c.action == "retention.purge")
                                          )).scalar()
        assert left == [ids[3]] and entries == 1

        # The counters do not go down: not in this process, not in a new one.
        again = await collector.snapshot(now=time.time() + 120)
        fresh = await metrics.Collector(store).snapshot()
        for s in (again, fresh):
            assert s.totals.accepted == {1: 5}
            assert s.totals.outcomes == snap.totals.outcomes
            # (how many; their latencies changed with the times the test moved)
            assert sum(s.totals.buckets) == sum(snap.totals.buckets) == 2
        assert [m["id"] for m in (await retention.user_data(core, alice))["messages"]] == [
            ids[3]]
        assert await metrics.probe_store(store) is None
    finally:
        await core.close()
