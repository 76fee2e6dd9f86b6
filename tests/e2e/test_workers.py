"""Several delivery workers sharing a PostgreSQL queue, as separate processes (`postier
worker`), against a real relay: no message delivered twice in normal operation; after a
worker is killed, its messages are delivered by the others and only those it had in flight
may be repeated."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from postier.config import ServerConfig
from postier.message import MessageIn
from postier.service import Postier

from support.relay import FaultRelay


async def _fill(url: str, data_dir: Path, relay: FaultRelay, count: int,
                **relay_limits: int) -> None:
    core = Postier(ServerConfig(data_dir=data_dir, database_url=url, hostname="ac-lyon.fr"))
    await core.open()
    try:
        admin = await core.add_user("admin", "direction@ac-lyon.fr", role="admin")
        await core.put_settings(admin, {
            "allowed_domains": ["ac-lyon.fr"],
            "relay": {"host": relay.host, "port": relay.port, "security": "none",
                      "timeout": 10, **relay_limits},
            "retry": {"first_delay": 1, "max_delay": 2},
        })
        for start in range(0, count, 1000):
            await core.submit(admin, [
                MessageIn.model_validate({"to": [f"eleve{i}@example.org"],
                                          "subject": f"n{i}", "text": "Bonjour"})
                for i in range(start, min(count, start + 1000))
            ])
    finally:
        await core.close()


def _workers(url: str, data_dir: Path, n: int, **env: str) -> list[subprocess.Popen[bytes]]:
    full = {**os.environ, "POSTIER_POLL_INTERVAL": "0.2", **env}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "postier", "worker", "--database-url", url,
             "--data-dir", str(data_dir / f"w{i}")],
            env=full, stdout=(data_dir / f"w{i}.log").open("wb"), stderr=subprocess.STDOUT,
        )
        for i in range(n)
    ]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


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
    asyncio.run(_fill(pg_url, tmp_path, relay, 5000))
    procs = _workers(pg_url, tmp_path, 3, POSTIER_SECRET_KEY=shared_key)
    try:
        relay.wait_for(5000, timeout=180)
        time.sleep(1.0)  # anything sent twice would arrive now
    finally:
        _stop(procs)
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
    asyncio.run(_fill(pg_url, tmp_path, relay, 400))
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
        _stop(procs)
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
    asyncio.run(_fill(pg_url, tmp_path, relay, 200, max_connections=2))
    # Alone, each process would open up to 3 connections to the relay: 9 together.
    procs = _workers(pg_url, tmp_path, 3, POSTIER_SECRET_KEY=shared_key,
                     POSTIER_RELAY_CONCURRENCY="3")
    try:
        relay.wait_for(200, timeout=60)
        time.sleep(1.0)  # anything sent twice would arrive now
    finally:
        _stop(procs)
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
    asyncio.run(_fill(pg_url, tmp_path, relay, 1))
    r = subprocess.run(
        [sys.executable, "-m", "postier", "worker", "--database-url", pg_url,
         "--data-dir", str(tmp_path / "other")],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "POSTIER_SECRET_KEY": Fernet.generate_key().decode()},
    )
    assert r.returncode == 1 and "another key" in r.stderr.replace("\n", " ")
