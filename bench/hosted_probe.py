"""Delivery of a hosted installation (many establishments, one platform relay), in one
process: the store (SQLite file or PostgreSQL), Postier's delivery worker and relay pool as
``postier serve`` builds them (``server.make_worker``: 4 connections per relay, claims of
64, the shared limits), and a real SMTP relay (aiosmtpd, in a thread of its own) that takes
``--relay-delay`` seconds an e-mail.

``--mode alone``: one establishment's flood alone; its rate.
``--mode shared``: the same flood, while ``--senders`` other establishments each send one
e-mail every ``--interval`` seconds through the same relay, and one more establishment's
relay accepts connections and never answers. The time of each of the others' e-mails from
its acceptance (the store's commit: when the API answers 202) to the relay, and the
flood's rate.
``--mode scale``: ``--messages`` e-mails spread over ``--establishments`` establishments
queued, then drained into an instant relay: CPU and claim time per e-mail.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from postier.core.settings import DeliverySettings, RelaySettings
from postier.delivery.limits import SharedLimits
from postier.delivery.pool import RelayPool
from postier.delivery.worker import DeliveryWorker
from postier.store import create_store, database_url
from postier.store.base import NewMessage, Store

FLOOD = 1


class Relay:
    """Records when each e-mail arrives (by its X-Bench-Id), after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.arrived: dict[str, float] = {}
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        data: bytes = envelope.original_content or envelope.content
        start = data.index(b"X-Bench-Id: ") + 12
        ident = data[start:data.index(b"\r\n", start)].decode()
        with self.lock:
            self.arrived[ident] = time.time()
        return "250 2.0.0 Ok"


class DeadRelay:
    """Accepts connections and never says a word."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def hold(_r: asyncio.StreamReader, _w: asyncio.StreamWriter) -> None:
                await asyncio.sleep(3600)

            server = self.loop.run_until_complete(asyncio.start_server(hold, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)


async def until(done: Callable[[], bool], step: float) -> None:
    """Wait for what the relay's thread records (it cannot set this loop's events)."""
    for _ in itertools.count():
        if done():
            return
        await asyncio.sleep(step)


def message(ident: str, est: int) -> NewMessage:
    data = (f"From: ecole{est}@ac-lyon.fr\r\nTo: parent@example.org\r\nSubject: {ident}\r\n"
            f"X-Bench-Id: {ident}\r\n\r\n" + ("x" * 76 + "\r\n") * 26).encode()
    return NewMessage(id=ident, establishment_id=est, user_id=est, priority=0,
                      envelope_from=f"ecole{est}@ac-lyon.fr", header_from="",
                      message_id=f"<{ident}@bench>", subject=ident, data=data,
                      recipients=["parent@example.org"])


def settings(port: int, timeout: int = 30) -> DeliverySettings:
    return DeliverySettings(relay=RelaySettings(host="127.0.0.1", port=port,
                                                security="none", timeout=timeout))


class TimedStore:
    """Counts the store's claims and their time."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.claims = 0
        self.claim_seconds = 0.0
        real = store.claim

        async def claim(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await real(*args, **kwargs)
            finally:
                self.claims += 1
                self.claim_seconds += time.perf_counter() - t0

        store.claim = claim  # type: ignore[method-assign]


async def run(a: argparse.Namespace) -> dict[str, Any]:
    relay = Relay(a.relay_delay)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(relay, hostname="127.0.0.1", port=port)
    controller.start()
    dead = DeadRelay()
    live, silent = settings(port), settings(dead.port, timeout=5)
    # In --mode shared, the establishment after the senders has the dead relay.
    dead_est = a.senders + 2 if a.mode == "shared" else -1

    async def settings_for(est: int) -> DeliverySettings:
        return silent if est == dead_est else live

    tmp = tempfile.mkdtemp(prefix="hosted-probe-")
    store = create_store(database_url(Path(tmp), a.database_url))
    await store.open()
    timed = TimedStore(store)
    worker = DeliveryWorker(store, settings_for, pool=RelayPool(
        concurrency=4, limits=SharedLimits(store)), claim_batch=64, poll_interval=1.0)
    try:
        if a.mode == "scale":
            return await scale(a, store, worker, relay, timed)
        return await hosted(a, store, worker, relay, dead_est)
    finally:
        await worker.stop(grace=1)
        await store.close()
        controller.stop()


async def hosted(a: argparse.Namespace, store: Store, worker: DeliveryWorker, relay: Relay,
                 dead_est: int) -> dict[str, Any]:
    await worker.start()
    accepted: dict[str, float] = {}
    flood_ids = [f"f{i}" for i in range(a.messages)]
    done = asyncio.Event()

    async def sender(est: int, offset: float) -> None:
        await asyncio.sleep(offset)
        n = 0
        while not done.is_set():
            ident = f"s{est}-{n}"
            await store.enqueue([message(ident, est)])
            accepted[ident] = time.time()
            worker.notify()
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), a.interval)

    senders = []
    if a.mode == "shared":
        ests = [*range(2, a.senders + 2), dead_est]
        senders = [asyncio.create_task(sender(est, a.interval * i / len(ests)))
                   for i, est in enumerate(ests)]
        await asyncio.sleep(a.interval)  # the trickles are under way before the flood
    for start in range(0, a.messages, 1000):
        await store.enqueue([message(i, FLOOD) for i in flood_ids[start:start + 1000]])
        worker.notify()
    await until(lambda: all(i in relay.arrived for i in flood_ids), 0.05)
    flood_end = max(relay.arrived[i] for i in flood_ids)
    done.set()
    await asyncio.gather(*senders)
    during = [i for i, at in accepted.items()
              if at <= flood_end and not i.startswith(f"s{dead_est}-")]
    deadline = time.monotonic() + 60
    await until(lambda: time.monotonic() > deadline
                or all(i in relay.arrived for i in during), 0.05)
    waits = sorted(relay.arrived.get(i, float("inf")) - accepted[i] for i in during)
    first = min(relay.arrived[i] for i in flood_ids)
    out: dict[str, Any] = {"flood": a.messages, "flood_seconds": flood_end - first,
                           "flood_rate": (a.messages - 1) / (flood_end - first)}
    if waits:
        out.update(others=len(waits), others_p50_s=statistics.median(waits),
                   others_p99_s=waits[min(len(waits) - 1, int(len(waits) * 0.99))],
                   others_max_s=waits[-1],
                   dead_sent=sum(1 for i in relay.arrived if i.startswith(f"s{dead_est}-")))
    return out


async def database_cpu(store: Store) -> dict[int, float]:
    """PostgreSQL: the CPU seconds used so far by each server process serving this
    database (the store's pooled connections; the server runs on this machine). Empty on
    SQLite, whose work is done in this process."""
    engine = getattr(store, "write_engine", None)
    if engine is None or engine.dialect.name != "postgresql":
        return {}
    async with engine.connect() as conn:
        pids = [int(r[0]) for r in await conn.exec_driver_sql(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")]
    return {pid: t for pid in pids if (t := process_cpu(pid)) is not None}


def process_cpu(pid: int) -> float | None:
    """The CPU seconds (user and system) process ``pid`` used so far; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def scale(a: argparse.Namespace, store: Store, worker: DeliveryWorker, relay: Relay,
                timed: TimedStore) -> dict[str, Any]:
    ids = [f"m{i}" for i in range(a.messages)]
    for start in range(0, a.messages, 1000):
        await store.enqueue([message(i, 1 + n % a.establishments)
                             for n, i in enumerate(ids[start:start + 1000], start)])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    db0 = await database_cpu(store)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    await worker.start()
    await until(lambda: len(relay.arrived) >= a.messages, 0.02)
    seconds = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    db1 = await database_cpu(store)
    db_cpu = sum(t - db0.get(pid, 0.0) for pid, t in db1.items())
    return {"db_cpu_us_per_msg": db_cpu / a.messages * 1e6,
            "total_cpu_us_per_msg": (cpu + db_cpu) / a.messages * 1e6,
            "establishments": a.establishments, "messages": a.messages, "seconds": seconds,
            "rate": a.messages / seconds, "cpu_us_per_msg": cpu / a.messages * 1e6,
            "claims": timed.claims,
            "claim_ms": timed.claim_seconds / max(1, timed.claims) * 1000,
            "claim_us_per_msg": timed.claim_seconds / a.messages * 1e6,
            "maxrss_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["alone", "shared", "scale"], required=True)
    p.add_argument("--database-url")
    p.add_argument("--messages", type=int, default=6000)
    p.add_argument("--senders", type=int, default=5)
    p.add_argument("--interval", type=float, default=0.4)
    p.add_argument("--relay-delay", type=float, default=0.005)
    p.add_argument("--establishments", type=int, default=1)
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
