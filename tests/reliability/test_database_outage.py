"""PostgreSQL stopped for a few seconds, then started again, under a queue: delivery
resumes by itself in every process, and the doors say "try later" meanwhile. The tests
stop a private cluster of their own (support/pg_cluster.py), never the shared one."""

from __future__ import annotations

import asyncio
import collections
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography.fernet import Fernet
from reliability_kit import wait_delivered, wait_until

from support.pg_cluster import PrivateCluster, private_pg  # noqa: F401 (fixture)
from support.relay import FaultRelay
from support.server import ServerProcess
from support.workers import start_worker, stop_workers

pytestmark = pytest.mark.postgres
OUTAGE_SECONDS = 5  # the scenario itself: how long the database is away


async def _create_database(cluster: PrivateCluster) -> str:
    conn = await asyncpg.connect(cluster.url, timeout=10)
    try:
        await conn.execute('CREATE DATABASE "postier"')
    finally:
        await conn.close()
    return cluster.url.rsplit("/", 1)[0] + "/postier"


def _ready(server: ServerProcess) -> int:
    try:
        return httpx.get(server.url + "/api/v1/ready", timeout=5).status_code
    except httpx.HTTPError:
        return 0


@pytest.fixture
def outage_setup(private_pg: PrivateCluster, server_factory: Any, tmp_path: Path,  # noqa: F811
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """``postier serve --no-delivery`` on the private cluster, with a shared secret key
    for the ``postier worker`` processes a test starts."""
    url = asyncio.run(_create_database(private_pg))
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("POSTIER_DATABASE_URL", url)
    monkeypatch.setenv("POSTIER_SECRET_KEY", key)
    server: ServerProcess = server_factory(POSTIER_SECRET_KEY=key)
    server.args = ["--no-delivery"]
    server.start()
    workers: list[subprocess.Popen[bytes]] = []
    yield {"cluster": private_pg, "url": url, "server": server, "workers": workers,
           "env": {"POSTIER_SECRET_KEY": key, "POSTIER_RELAY_CONCURRENCY": "4",
                   "POSTIER_POLL_INTERVAL": "30"},
           "tmp": tmp_path}
    if not private_pg.running():
        private_pg.start()
    stop_workers(workers)


def _submit(server: ServerProcess, count: int, prefix: str) -> set[str]:
    msgs = [{"to": [f"{prefix}{i}@example.org"], "subject": f"{prefix}{i}", "text": "Bonjour"}
            for i in range(count)]
    with server.client("alice") as c:
        r = c.post("/api/v1/messages/batch", json={"messages": msgs})
    assert r.status_code == 202, r.text
    return {m["subject"] for m in msgs}


@pytest.mark.timeout(240)
def test_delivery_resumes_by_itself_after_the_database_comes_back(
    outage_setup: dict[str, Any], relay: FaultRelay
) -> None:
    server: ServerProcess = outage_setup["server"]
    cluster: PrivateCluster = outage_setup["cluster"]
    server.configure_relay(relay)
    relay.stall = ("after_data", 0.05)
    workers = outage_setup["workers"]
    logs = []
    for name in ("w0", "w1"):
        proc, log = start_worker(outage_setup["url"], outage_setup["tmp"], name,
                                 outage_setup["env"])
        workers.append(proc)
        logs.append(log)
    wait_until(lambda: all("delivery worker" in log.read_text() for log in logs),
               timeout=30, what="both workers running")
    wanted = _submit(server, 300, "avant")
    relay.wait_for(10, timeout=30)
    cluster.stop()
    stopped_at = time.monotonic()
    try:
        wait_until(lambda: _ready(server) == 503, timeout=15,
                   what="readiness 503 while the database is away")
        # The outage lasts its length whatever the test does meanwhile.
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped_at)))
    finally:
        cluster.start()
    wait_delivered(relay, wanted, timeout=90,
                   what="every queued e-mail delivered after the outage, no restart")
    wait_until(lambda: _ready(server) == 200, timeout=30, what="readiness 200 again")
    assert server.proc is not None and server.proc.poll() is None, "the server stayed up"
    assert all(p.poll() is None for p in workers), "both workers stayed up"
    # Wake-ups work again too (the LISTEN connection was made again): a new e-mail goes
    # out at once, where the workers' polling (every 30 s here) would be far too slow.
    more = _submit(server, 1, "apres")
    wait_delivered(relay, more, timeout=10, what="a new e-mail woken at once")
    for log in logs:
        outages = collections.Counter(re.findall(
            r"postier.outage: (.+?): the store is unavailable", log.read_text()))
        assert outages, "the outage is in the worker's log"
        assert set(outages.values()) == {1}, (
            f"each loop logs the outage once, not at every try: {outages}")

