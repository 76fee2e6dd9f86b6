"""At most one duplicate per open relay connection when a worker is killed: a connection
carries its next e-mail only once the result of the last one is recorded. The results are
held back (their table locked) while the worker goes on, then the worker is killed with
``kill -9`` and another one takes its e-mails over."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from reliability_kit import subjects, wait_delivered, wait_until

from support.relay import FaultRelay
from support.workers import CONCURRENCY, fill_queue, pg_queue, start_worker

pytestmark = pytest.mark.postgres
HELD_BACK_SECONDS = 2.0  # the scenario itself: how long results cannot be written


@pytest.fixture
def queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    with pg_queue(tmp_path, POSTIER_LEASE_SECONDS="4") as q:
        monkeypatch.setenv("POSTIER_SECRET_KEY", q["env"]["POSTIER_SECRET_KEY"])
        yield q


async def _hold_results_then_kill(url: str, pid: int) -> None:
    """Lock the attempts table (every result written inserts there) for a while, kill
    the worker, then let go."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE attempts IN EXCLUSIVE MODE")
            await asyncio.sleep(HELD_BACK_SECONDS)
            os.kill(pid, signal.SIGKILL)
    finally:
        await conn.close()


async def _statuses(url: str) -> set[str]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return {r["status"] for r in await conn.fetch("SELECT DISTINCT status FROM messages")}
    finally:
        await conn.close()


@pytest.mark.timeout(180)
def test_a_killed_worker_repeats_at_most_one_email_per_relay_connection(
    queue: dict[str, Any], relay: FaultRelay
) -> None:
    total = 300
    asyncio.run(fill_queue(queue["url"], queue["tmp"], relay, total))
    relay.stall = ("after_data", 0.02)
    killed, log = start_worker(queue["url"], queue["tmp"], "w0", queue["env"])
    queue["procs"].append(killed)
    wait_until(lambda: re.search(r"delivery worker w-", log.read_text()), timeout=30,
               what="the worker running")
    relay.wait_for(10, timeout=30)
    sent_before = len(relay.messages)
    asyncio.run(_hold_results_then_kill(queue["url"], killed.pid))
    killed.wait(10)
    sent_meanwhile = len(relay.messages) - sent_before
    other, _ = start_worker(queue["url"], queue["tmp"], "w1", queue["env"])
    queue["procs"].append(other)
    wait_delivered(relay, {f"n{i}" for i in range(total)}, timeout=90)
    # The e-mails whose results were lost went out before the kill: they come back when
    # the dead worker's leases expire, and go out again.
    wait_until(lambda: asyncio.run(_statuses(queue["url"])) == {"sent"}, timeout=60,
               what="every e-mail recorded as sent")
    got = subjects(relay.messages)
    repeated = {s: n for s, n in got.items() if n > 1}
    duplicates = sum(n - 1 for n in repeated.values())
    # What the relay took while no result could be written was sent again: with a
    # connection that waits for its result, at most one e-mail per connection.
    assert duplicates <= CONCURRENCY, (
        f"{duplicates} duplicates with {CONCURRENCY} relay connections "
        f"({sent_meanwhile} sent while results were held back): {repeated}")
