"""``delivery_pg``: the ``delivery`` scenario with the queue on PostgreSQL.

The queue (20,000 e-mails of 2 KiB) is filled once through the batch API into a template
database; every measurement drains a fresh copy of it (``CREATE DATABASE … TEMPLATE``)
with 1 and then 3 ``postier worker`` processes sharing it, into ``smtp-sink``. The
baseline is the same as in ``delivery``: raw aiosmtplib sending the stored bytes of an
identical SQLite queue over as many connections as one worker opens.
"""

from __future__ import annotations

import os
import time

from harness import (
    Measurement,
    Process,
    Ratio,
    System,
    copy_dir,
    make_template,
    pg_create,
    pg_drop,
    status_counts,
)
from targets import cpu_seconds

from scenarios.delivery import Delivery
from scenarios.smtp_relay import worker_process
from scenarios.smtp_relay_pg import pg_settings

ORDER = 35


class _Workers:
    """Several processes seen as one by ``Delivery._drained``."""

    def __init__(self, procs: list[Process]) -> None:
        self.procs = procs

    def alive(self) -> bool:
        return all(p.alive() for p in self.procs)

    def log_tail(self, lines: int = 10) -> str:
        return "\n".join(p.log_tail(lines) for p in self.procs)


class DeliveryPg(Delivery):
    name = "delivery_pg"
    description = "delivery on PostgreSQL: 1 or 3 postier worker draining a shared queue"

    def prepare(self) -> None:
        super().prepare()  # the SQLite queue the baseline reads its bytes from
        self.params["postgresql"] = pg_settings()
        self._prefix = f"postier_bench_{os.getpid()}_{self.name}"
        tpl = f"{self._prefix}_tpl"
        url = pg_create(tpl)
        self.on_close(lambda: pg_drop(tpl))
        self.pg_dir, token = make_template(self.ctx, self.name, self.sink.port,
                                           database_url=url)
        self._fill(self.params["messages"], self.pg_dir, token, database_url=url)

    def measure_pg(self, r: int, workers: int) -> Measurement:
        count = self.params["messages"]
        name = f"{self._prefix}_r{r}_w{workers}"
        url = pg_create(name, template=f"{self._prefix}_tpl")
        self.on_close(lambda: pg_drop(name))
        data_dir = copy_dir(self.pg_dir, self.ctx.workdir / f"{self.name}-r{r}-w{workers}")
        procs = [worker_process(self.ctx, data_dir, url, i) for i in range(workers)]
        base = self.sink.count
        spawned = time.monotonic()
        try:
            for p in procs:
                p.start()
            group = _Workers(procs)
            # CPU counted from the first delivery: the workers' start-up is not in it.
            self.sink.wait_for(base + 1, self.params["timeout_s"], alive=group.alive)
            cpu0, at0 = sum(cpu_seconds(p.pid) for p in procs), self.sink.count
            window = self._window()
            first, last = self._drained(base, group)  # type: ignore[arg-type]
            cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu0
            other = window(cpu)
        finally:
            for p in procs:
                p.stop()
        m = self._measurement(first, last, cpu, base + count - at0)
        m.extra["other_cpu_cores"] = other
        m.extra["start_to_first_s"] = first - spawned
        counts = status_counts(url)
        if counts.get("sent") != count:
            m.notes.append(f"statuses after the drain: {counts}")
        return m

    def systems(self) -> list[System]:
        c = self.params["connections"]

        def with_workers(n: int) -> System:
            return System(f"postier-pg-{n}w", "postier", lambda r: self.measure_pg(r, n),
                          f"{n} postier worker on PostgreSQL, {c} relay connections each")

        return [with_workers(1), with_workers(3),
                System("aiosmtplib", "baseline", self.measure_baseline,
                       f"raw aiosmtplib, same bytes, {c} reused connections, asyncio loop")]

    def ratios(self) -> list[Ratio]:
        return [Ratio("Postier (PostgreSQL, 1 worker) / Python ceiling", "postier-pg-1w",
                      "aiosmtplib", target=0.80),
                Ratio("Postier (PostgreSQL, 3 workers) / Python ceiling", "postier-pg-3w",
                      "aiosmtplib", target=0.80)]


SCENARIO = DeliveryPg
