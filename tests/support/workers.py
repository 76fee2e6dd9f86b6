"""``postier worker`` processes on a shared PostgreSQL queue, and the queue they drain."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
from cryptography.fernet import Fernet

from postier.core.message import MessageIn
from postier.core.service import Postier
from postier.server.config import ServerConfig

from support.databases import create_pg_database, drop_pg_database
from support.relay import FaultRelay

CONCURRENCY = 4  # relay connections per worker in the scenarios below


@contextlib.contextmanager
def pg_queue(data_dir: Path, **env: str) -> Iterator[dict[str, Any]]:
    """A PostgreSQL database of its own for a scenario with worker processes: its URL,
    the processes started (stopped at the end), a data directory and the workers'
    environment (one secret key, ``CONCURRENCY`` connections, then ``env``). The caller
    sets ``POSTIER_SECRET_KEY`` in its own environment to ``env``'s, so that what it
    queues is readable by the workers."""
    url = create_pg_database()
    key = Fernet.generate_key().decode()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield {"url": url, "procs": procs, "tmp": data_dir,
               "env": {"POSTIER_SECRET_KEY": key,
                       "POSTIER_RELAY_CONCURRENCY": str(CONCURRENCY), **env}}
    finally:
        stop_workers(procs)
        drop_pg_database(url)


async def leases_by_worker(url: str) -> collections.Counter[str]:
    """How many e-mails each worker holds now (status ``sending``), by lease owner."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return collections.Counter({r["lease_owner"]: r["n"] for r in await conn.fetch(
            "SELECT lease_owner, count(*) AS n FROM messages WHERE status = 'sending' "
            "GROUP BY lease_owner")})
    finally:
        await conn.close()


async def fill_queue(url: str, data_dir: Path, relay: FaultRelay, count: int,
                     **relay_limits: int) -> None:
    """An establishment whose relay is ``relay`` (quick retries), and ``count`` e-mails
    queued for it, subjects ``n0`` … ``n{count-1}``."""
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


def start_worker(url: str, data_dir: Path, name: str, env: dict[str, str]
                 ) -> tuple[subprocess.Popen[bytes], Path]:
    """A ``postier worker`` polling every 0.2 s, its output in ``data_dir/name.log``."""
    log = data_dir / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "postier", "worker", "--database-url", url,
         "--data-dir", str(data_dir / name)],
        env={**os.environ, "POSTIER_POLL_INTERVAL": "0.2", **env},
        stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return proc, log


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
