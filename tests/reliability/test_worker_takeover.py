"""A ``postier worker`` killed (``kill -9``) with e-mails in hand: another worker sends
them within seconds, not after minutes; and a slow but live delivery is never taken
over. Real worker processes on the shared PostgreSQL, a real relay."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_kit import subjects, wait_delivered, wait_until

from support.relay import FaultRelay
from support.workers import CONCURRENCY, fill_queue, leases_by_worker, pg_queue, start_worker

pytestmark = pytest.mark.postgres
# Well under the lease of 120 s e-mails had before: a dead worker's e-mails go out again
# this soon after its death.
TAKEN_OVER_WITHIN = 30.0


def _worker_id(log: Path) -> str | None:
    found = re.findall(r"delivery worker (w-[0-9a-f]+)", log.read_text())
    return found[0] if found else None


@pytest.fixture
def queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    with pg_queue(tmp_path) as q:
        monkeypatch.setenv("POSTIER_SECRET_KEY", q["env"]["POSTIER_SECRET_KEY"])
        yield q


@pytest.mark.timeout(180)
def test_a_killed_workers_emails_are_sent_by_another_within_seconds(
    queue: dict[str, Any], relay: FaultRelay
) -> None:
    total = 300
    asyncio.run(fill_queue(queue["url"], queue["tmp"], relay, total))
    relay.stall = ("after_data", 0.05)
    killed, killed_log = start_worker(queue["url"], queue["tmp"], "w0", queue["env"])
    queue["procs"].append(killed)
    worker_id = wait_until(lambda: _worker_id(killed_log), timeout=30,
                           what="the first worker running")
    wait_until(lambda: asyncio.run(leases_by_worker(queue["url"]))[worker_id] >= 50
               and len(relay.messages) >= 5, timeout=30, what="e-mails in hand")
    other, _ = start_worker(queue["url"], queue["tmp"], "w1", queue["env"])
    queue["procs"].append(other)
    os.kill(killed.pid, signal.SIGKILL)
    died = time.monotonic()
    killed.wait(10)
    held = asyncio.run(leases_by_worker(queue["url"]))[worker_id]
    assert held > 0, "the killed worker held e-mails"
    wait_until(lambda: asyncio.run(leases_by_worker(queue["url"]))[worker_id] == 0,
               timeout=TAKEN_OVER_WITHIN, what="the dead worker's e-mails taken over")
    taken_over = time.monotonic() - died
    wait_delivered(relay, {f"n{i}" for i in range(total)},
                   timeout=TAKEN_OVER_WITHIN + 30 - (time.monotonic() - died),
                   what="every e-mail delivered, the dead worker's by the other")
    got = subjects(relay.messages)
    duplicates = {s: n for s, n in got.items() if n > 1}
    # Only what was on the wire at the kill (one conversation per relay connection) may
    # have been sent twice.
    assert sum(n - 1 for n in duplicates.values()) <= CONCURRENCY, duplicates
    print(f"held {held}, taken over after {taken_over:.1f} s")


@pytest.mark.timeout(180)
def test_a_slow_live_delivery_is_not_taken_over(
    queue: dict[str, Any], relay: FaultRelay
) -> None:
    asyncio.run(fill_queue(queue["url"], queue["tmp"], relay, 1))
    # The relay takes longer than a lease to answer the final dot: the worker that sends
    # is alive, renews its lease meanwhile, and no other one sends the e-mail again.
    # Four leases, within the relay's time-out (10 s, support/workers.py).
    lease = 2.0
    env = {**queue["env"], "POSTIER_LEASE_SECONDS": str(lease)}
    relay.stall = ("after_data", lease * 4)
    first, first_log = start_worker(queue["url"], queue["tmp"], "w0", env)
    queue["procs"].append(first)
    wait_until(lambda: _worker_id(first_log), timeout=30, what="the first worker running")
    wait_until(lambda: sum(asyncio.run(leases_by_worker(queue["url"])).values()) == 1, timeout=30,
               what="the e-mail in hand")
    second, _ = start_worker(queue["url"], queue["tmp"], "w1", env)
    queue["procs"].append(second)
    relay.wait_for(1, timeout=lease * 4 + 30)
    # Past the slow answer, then a lease more: a second copy would have come by then.
    time.sleep(lease * 2)
    assert len(relay.messages) == 1, [m.message["Subject"] for m in relay.messages]
