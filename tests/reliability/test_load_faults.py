"""Promise 1 under load, on the real server process: the relay down for a stretch while
thousands of e-mails are accepted, and the server killed (SIGKILL) again and again while it
accepts and delivers. Every acknowledged e-mail is delivered; duplicates are counted and
bounded by what was in flight when the server died."""

from __future__ import annotations

import signal
import time
from typing import Any

import httpx
import pytest
from reliability_kit import (
    Submitter,
    by_message_id,
    database,
    duplicates,
    quick_retry,
    record_figures,
    statuses,
    subjects,
    wait_delivered,
    wait_until,
)

from support.relay import FaultRelay
from support.server import ServerProcess

BATCH = 500


def test_relay_down_while_2000_are_submitted_then_back(
    server_factory: Any, relay: FaultRelay
) -> None:
    server: ServerProcess = server_factory().start()
    quick_retry(server, relay)
    relay.down()
    total = 2000
    ids: list[str] = []
    t0 = time.monotonic()
    with server.client("alice") as c:
        for start in range(0, total, BATCH):
            r = c.post("/api/v1/messages/batch", json={"messages": [
                {"to": [f"eleve{i}@example.org"], "subject": f"n{i}", "text": "Bonjour"}
                for i in range(start, start + BATCH)]}, timeout=60)
            assert r.status_code == 202, r.text
            ids += [m["id"] for m in r.json()["messages"]]
    accept_s = time.monotonic() - t0
    assert len(set(ids)) == total
    # Down for a stretch: every e-mail is tried and deferred, some several times.
    wait_until(lambda: statuses(server.data_dir).get("deferred", 0) == total, timeout=60,
               what="every e-mail deferred while the relay is down")
    time.sleep(3)
    with database(server.data_dir) as db:
        attempts_down = db.execute("SELECT count(*) FROM attempts").fetchone()[0]
    assert attempts_down >= total
    relay.up()
    t1 = time.monotonic()
    relay.wait_for(total, timeout=120)
    drain_s = time.monotonic() - t1
    wait_until(lambda: statuses(server.data_dir) == {"sent": total}, timeout=30,
               what="every e-mail sent")
    time.sleep(1.5)  # anything sent twice would arrive now
    got = subjects(relay.messages)
    assert set(got) == {f"n{i}" for i in range(total)}, "none lost"
    dups = duplicates(by_message_id(relay.messages))
    assert dups == 0, f"{dups} e-mails delivered twice"
    record_figures("relay down during 2,000 submissions", submitted=total, acknowledged=total,
                   acceptance_seconds=round(accept_s, 2),
                   attempts_while_down=attempts_down,
                   delivered=len(got), lost=total - len(got), duplicates=dups,
                   drain_seconds=round(drain_s, 2))


def _in_flight_at_kill(server: ServerProcess) -> int:
    """E-mails a killed server had claimed and not recorded: the only ones it may have
    handed to the relay without writing it down."""
    with database(server.data_dir) as db:
        return int(db.execute("SELECT count(*) FROM messages WHERE status = 'sending'")
                   .fetchone()[0])


# Five restarts, then a drain whose allowance grows with what was accepted (up to about
# two minutes on a fast machine): beyond the suite's default 120 s per test.
@pytest.mark.timeout(300)
def test_sigkill_five_times_under_load(server_factory: Any, relay: FaultRelay) -> None:
    server: ServerProcess = server_factory(POSTIER_RELAY_CONCURRENCY="4")
    server.start()
    quick_retry(server, relay)
    relay.stall = ("after_data", 0.01)  # deliveries take a little while: some are in flight
    kills, in_flight = 5, []
    load = Submitter(server.url, server.tokens["alice"], batch=5, prefix="k")
    load.start()
    try:
        for _ in range(kills):
            time.sleep(1.0)
            assert server.proc is not None
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(10)
            server.proc = None
            in_flight.append(_in_flight_at_kill(server))
            server.start()
        time.sleep(1.0)
    finally:
        load.stop()
    acknowledged = set(load.acknowledged.values())
    assert len(acknowledged) > 100, "the load ran"
    # The load is as fast as the server accepts: the time allowed grows with what it took.
    drain_start = time.monotonic()
    wait_delivered(relay, acknowledged, timeout=60 + len(acknowledged) / 100)
    drain_seconds = round(time.monotonic() - drain_start, 1)
    wait_until(lambda: not (set(statuses(server.data_dir)) - {"sent"}), timeout=30,
               what="nothing left in the queue")
    time.sleep(1.0)
    got = subjects(relay.messages)
    lost = acknowledged - set(got)
    assert not lost, f"{len(lost)} acknowledged e-mails lost"
    dups = sum(n - 1 for n in got.values())
    # A duplicate can only come from an e-mail the relay took while the server was dying
    # with the e-mail still "sending" in the store.
    assert dups <= sum(in_flight), (dups, in_flight)
    # Stored but unanswered (the server died before its 202): delivered too, as a bonus.
    stored_unacknowledged = len(set(got) - acknowledged)
    record_figures("SIGKILL x5 under load", kills=kills, acknowledged=len(acknowledged),
                   requests_unanswered_while_down=load.unanswered,
                   refused=dict(load.refused),
                   delivered=len(set(got) & acknowledged), lost=len(lost),
                   duplicates=dups, in_flight_at_kills=in_flight,
                   stored_without_answer_delivered=stored_unacknowledged,
                   drain_seconds_after_the_load=drain_seconds)
    with httpx.Client(base_url=server.url, timeout=10,
                      headers={"Authorization": f"Bearer {server.tokens['admin']}"}) as c:
        assert c.get("/api/v1/ready").status_code == 200
