"""Several delivery workers sharing a PostgreSQL queue, as separate processes (`postier
worker`), against a real relay: no message delivered twice in normal operation; after a
worker is killed, its messages are delivered by the others and only those it had in flight
may be repeated."""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from support.relay import FaultRelay
from support.workers import fill_queue, start_worker, stop_workers


def _workers(url: str, data_dir: Path, n: int, **env: str) -> list[subprocess.Popen[bytes]]:
    return [start_worker(url, data_dir, f"w{i}", env)[0] for i in range(n)]


def _per_message(relay: FaultRelay) -> collections.Counter[str]:
    return collections.Counter(m.message["Subject"] for m in relay.messages)


@pytest.fixture
def shared_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("POSTIER_SECRET_KEY", key)
    return key


def test_three_workers_deliver_5000_messages_once(
    pg_url: str, relay: FaultRelay, tmp_path: Path, shared_key: str
) -> None:
    asyncio.run(fill_queue(pg_url, tmp_path, relay, 5000))
    procs = _workers(pg_url, tmp_path, 3, POSTIER_SECRET_KEY=shared_key)
    try:
        relay.wait_for(5000, timeout=180)
        time.sleep(1.0)  # anything sent twice would arrive now
    finally:
        stop_workers(procs)
    counts = _per_message(relay)
    assert len(counts) == 5000
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates == 0, f"{duplicates} messages delivered twice"
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(3)]
    assert all("sent" in log for log in logs), "every worker took its share"


def test_killed_worker_messages_are_delivered_by_the_others(
    pg_url: str, relay: FaultRelay, tmp_path: Path, shared_key: str
) -> None:
    relay.stall = ("after_data", 0.05)  # each message takes a while: some are in flight
    asyncio.run(fill_queue(pg_url, tmp_path, relay, 400))
    procs = _workers(pg_url, tmp_path, 3, POSTIER_SECRET_KEY=shared_key,
                     POSTIER_LEASE_SECONDS="3", POSTIER_RELAY_CONCURRENCY="4")
    try:
        deadline = time.monotonic() + 30
        while len(relay.messages) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        procs[0].kill()  # SIGKILL: no chance to return its messages
        relay.wait_for(400, timeout=90)
        time.sleep(1.0)
    finally:
        stop_workers(procs)
    counts = _per_message(relay)
    assert len(counts) == 400, "every message delivered"
    duplicates = sum(c - 1 for c in counts.values())
    # Only deliveries in flight at the kill (at most one per open relay connection) may
    # be repeated.
    assert duplicates <= 4, f"{duplicates} duplicates"


def test_three_workers_share_the_relays_connection_limit(
    pg_url: str, relay: FaultRelay, tmp_path: Path, shared_key: str
) -> None:
    relay.stall = ("after_data", 0.005)  # deliveries overlap: each process wants several
    asyncio.run(fill_queue(pg_url, tmp_path, relay, 200, max_connections=2))
    # Alone, each process would open up to 3 connections to the relay: 9 together.
    procs = _workers(pg_url, tmp_path, 3, POSTIER_SECRET_KEY=shared_key,
                     POSTIER_RELAY_CONCURRENCY="3")
    try:
        relay.wait_for(200, timeout=60)
        time.sleep(1.0)  # anything sent twice would arrive now
    finally:
        stop_workers(procs)
    assert relay.max_sessions <= 2, (
        f"{relay.max_sessions} connections were open at once; the relay allows 2")
    counts = _per_message(relay)
    assert len(counts) == 200 and max(counts.values()) == 1, "every e-mail delivered once"


def test_worker_refuses_to_run_without_a_shared_queue(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "postier", "worker", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "PostgreSQL" in r.stderr


def test_worker_with_the_wrong_key_says_so(
    pg_url: str, relay: FaultRelay, tmp_path: Path, shared_key: str
) -> None:
    asyncio.run(fill_queue(pg_url, tmp_path, relay, 1))
    r = subprocess.run(
        [sys.executable, "-m", "postier", "worker", "--database-url", pg_url,
         "--data-dir", str(tmp_path / "other")],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "POSTIER_SECRET_KEY": Fernet.generate_key().decode()},
    )
    assert r.returncode == 1 and "another key" in r.stderr.replace("\n", " ")
