"""Soak test: the reliability campaign's kill and relay-down scenarios, for N minutes.

A real ``postier serve`` (SQLite, or PostgreSQL with ``--backend postgres``) receives a
steady load of e-mails over HTTP while, in turns, its relay goes down for a while and the
server is killed with SIGKILL and restarted. At the end the relay comes back for good, the
queue drains, and the run checks promise 1: every e-mail acknowledged with 202 was
delivered; duplicates are counted against the e-mails in flight at each kill.

    .venv/bin/python bench/soak.py --minutes 30
    .venv/bin/python bench/soak.py --minutes 10 --backend postgres

Everything stays on 127.0.0.1. The figures are printed as JSON and written to
``bench/results/soak-<time>.json``; the exit status is 1 when anything acknowledged was
lost (or a duplicate cannot be explained by what was in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "reliability")]

from reliability_kit import Submitter, database  # noqa: E402

from support.certs import make_self_signed  # noqa: E402
from support.relay import FaultRelay  # noqa: E402
from support.server import ServerProcess  # noqa: E402


class Tally:
    """What the relay received, by subject, emptied regularly so a long run stays small."""

    def __init__(self, relay: FaultRelay) -> None:
        self.relay = relay
        self.counts: collections.Counter[str] = collections.Counter()

    def collect(self) -> None:
        with self.relay._lock:
            got = list(self.relay._messages)
            self.relay._messages.clear()
        self.counts.update(str(m.message["Subject"]) for m in got)


def in_flight(server: ServerProcess, pg_url: str | None) -> int:
    if pg_url:
        import asyncpg

        async def count() -> int:
            conn = await asyncpg.connect(pg_url.replace("postgresql+asyncpg", "postgresql"))
            try:
                return int(await conn.fetchval(
                    "SELECT count(*) FROM messages WHERE status = 'sending'"))
            finally:
                await conn.close()

        return asyncio.run(count())
    with database(server.data_dir) as db:
        return int(db.execute("SELECT count(*) FROM messages WHERE status = 'sending'")
                   .fetchone()[0])


def queue_left(server: ServerProcess) -> int:
    with server.client("admin") as c:
        left = 0
        for status in ("queued", "sending", "deferred"):
            left += len(c.get("/api/v1/messages", params={"status": status,
                                                           "limit": 1000}).json())
        return left


def run(minutes: float, backend: str, kill_every: float, down_every: float,
        down_for: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="postier-soak-"))
    cert = make_self_signed(work / "certs")
    pg_url: str | None = None
    env: dict[str, str] = {"POSTIER_LEASE_SECONDS": "10"}
    if backend == "postgres":
        from support.databases import create_pg_database

        pg_url = create_pg_database()
        os.environ["POSTIER_DATABASE_URL"] = pg_url
        env["POSTIER_DATABASE_URL"] = pg_url
    relay = FaultRelay(cert=cert).start()
    tally = Tally(relay)
    server = ServerProcess(work / "data", env)
    server.provision()
    server.start()
    with server.client() as c:
        r = c.put("/api/v1/settings", json={
            "delegation": True, "allowed_domains": ["ac-lyon.fr"],
            "sender": {"name": "Collège", "address": "ne-pas-repondre@ac-lyon.fr"},
            "relay": {"host": relay.host, "port": relay.port, "security": "none",
                      "timeout": 5},
            "retry": {"first_delay": 1, "max_delay": 5, "max_age": 86400}})
        assert r.status_code == 200, r.text
    relay.stall = ("after_data", 0.005)
    load = Submitter(server.url, server.tokens["alice"], batch=10, prefix="soak", pause=0.02)
    load.start()
    kills, downs, in_flight_at_kills = 0, 0, []
    deadline = time.monotonic() + minutes * 60
    next_kill = time.monotonic() + kill_every * rng.uniform(0.5, 1.5)
    next_down = time.monotonic() + down_every * rng.uniform(0.5, 1.5)
    try:
        while time.monotonic() < deadline:
            time.sleep(0.5)
            tally.collect()
            now = time.monotonic()
            if now >= next_kill:
                assert server.proc is not None
                server.proc.send_signal(signal.SIGKILL)
                server.proc.wait(30)
                server.proc = None
                in_flight_at_kills.append(in_flight(server, pg_url))
                server.start(timeout=60)
                kills += 1
                next_kill = time.monotonic() + kill_every * rng.uniform(0.5, 1.5)
            if now >= next_down:
                relay.down()
                time.sleep(down_for * rng.uniform(0.5, 1.5))
                relay.up()
                downs += 1
                next_down = time.monotonic() + down_every * rng.uniform(0.5, 1.5)
    finally:
        load.stop()
    acknowledged = set(load.acknowledged.values())
    drain_deadline = time.monotonic() + 600
    while time.monotonic() < drain_deadline:
        tally.collect()
        if acknowledged <= set(tally.counts) and queue_left(server) == 0:
            break
        time.sleep(1)
    time.sleep(3)
    tally.collect()
    server.stop()
    relay.stop()
    lost = acknowledged - set(tally.counts)
    duplicates = sum(n - 1 for n in tally.counts.values() if n > 1)
    figures = {
        "backend": backend, "minutes": minutes, "seed": seed,
        "acknowledged": len(acknowledged), "delivered": len(acknowledged & set(tally.counts)),
        "lost": len(lost), "duplicates": duplicates,
        "stored_without_answer_delivered": len(set(tally.counts) - acknowledged),
        "kills": kills, "relay_outages": downs, "in_flight_at_kills": sum(in_flight_at_kills),
        "requests_unanswered": load.unanswered, "refused": dict(load.refused),
        "ok": not lost and duplicates <= sum(in_flight_at_kills),
    }
    if pg_url:
        from support.databases import drop_pg_database

        drop_pg_database(pg_url)
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 10)))
    p.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--kill-every", type=float, default=20.0, help="seconds, on average")
    p.add_argument("--relay-down-every", type=float, default=45.0, help="seconds, on average")
    p.add_argument("--relay-down-for", type=float, default=15.0, help="seconds, on average")
    p.add_argument("--seed", type=int, default=int(time.time()))
    args = p.parse_args()
    figures = run(args.minutes, args.backend, args.kill_every, args.relay_down_every,
                  args.relay_down_for, args.seed)
    print(json.dumps(figures, indent=2, sort_keys=True))
    out = ROOT / "bench" / "results" / f"soak-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
