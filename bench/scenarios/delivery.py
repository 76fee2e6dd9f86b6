"""``delivery``: drain a full queue into an SMTP relay.

The queue is filled once through the batch API (delivery off) and that data directory is
copied for every round. Postier then starts with delivery on and Postfix's ``smtp-sink`` as
its relay; the sink's counters time the drain, from the first message it receives to the
last. The baseline (the "Python ceiling") is raw aiosmtplib sending the very same stored
bytes over as many reused connections (``POSTIER_RELAY_CONCURRENCY``, 4 by default) to the
same sink, from one asyncio process, with nothing else to do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from harness import (
    BENCH_DIR,
    PYTHON,
    BenchError,
    Measurement,
    PostierServer,
    Process,
    Ratio,
    Scenario,
    Sink,
    System,
    copy_dir,
    log,
    make_template,
    message_json,
    status_counts,
    text_body,
    wait_settled,
)
from loadgen import build_request, run_async, run_load
from targets import child_pids, cpu_seconds, machine_busy_seconds, own_cpu_seconds

ORDER = 30
BATCH = "/api/v1/messages/batch"


class Delivery(Scenario):
    name = "delivery"
    description = "drain a queue of 2 KiB e-mails into smtp-sink over pooled connections"

    def prepare(self) -> None:
        ctx = self.ctx
        count = 2000 if ctx.quick else 20000
        concurrency = int(ctx.env.get("POSTIER_RELAY_CONCURRENCY", "4"))
        self.params = {"messages": count, "connections": concurrency, "body_bytes": 2048,
                       "timeout_s": 60 + count / 100}
        self.sink = Sink(ctx.workdir, prefer_python=ctx.python_sink)
        self.sink.start()
        self.on_close(self.sink.stop)
        self.params["sink"] = self.sink.kind
        template, self.token = make_template(ctx, self.name, self.sink.port)
        self.filled = copy_dir(template, ctx.workdir / "delivery-filled")
        self._fill(count, self.filled, self.token)

    def _fill(self, count: int, data_dir: Path, token: str,
              database_url: str | None = None) -> None:
        body = text_body(self.params["body_bytes"])
        size = 1000
        requests = [
            build_request("http://127.0.0.1", BATCH, json.dumps(
                {"messages": [message_json(i, body) for i in range(start, min(count,
                                                                             start + size))]}
            ).encode(), token)
            for start in range(0, count, size)
        ]
        server = PostierServer(self.ctx, data_dir, delivery=False,
                               database_url=database_url).start()
        try:
            res = run_async(lambda: run_load(server.url, requests, concurrency=2,
                                             request_timeout=120.0))
        finally:
            server.stop()
        counts = status_counts(database_url or data_dir / "postier.db")
        if counts != {"queued": count}:
            raise BenchError(f"filling the queue gave {counts}, not {count} queued: "
                             f"{res.errors} {res.sample_error}")
        self.params["fill_msg_per_s"] = round(count / res.seconds)
        log(f"delivery: queue filled with {count} e-mails ({count / res.seconds:.0f} msg/s)")

    def _drained(self, base: int, alive: Process) -> tuple[float, float]:
        count = self.params["messages"]
        if not self.sink.wait_for(base + count, self.params["timeout_s"], alive=alive.alive):
            got = self.sink.count - base
            why = "exited" if not alive.alive() else f"took over {self.params['timeout_s']} s"
            raise BenchError(f"only {got} of {count} e-mails reached the sink ({why})\n"
                             f"{alive.log_tail(10)}")
        return self.sink.arrival(base + 1), self.sink.arrival(base + count)

    def _window(self) -> Callable[[float], float]:
        """Start watching the machine; the function returned gives the CPU cores used
        meanwhile by anything but the sender under test (given its CPU seconds), this
        process and the sink: the noise of the measurement."""
        assert self.sink.pid is not None
        t0, busy0 = time.monotonic(), machine_busy_seconds()
        ours0 = own_cpu_seconds() + cpu_seconds(self.sink.pid)

        def other(sender_cpu: float) -> float:
            assert self.sink.pid is not None
            ours = own_cpu_seconds() + cpu_seconds(self.sink.pid) - ours0 + sender_cpu
            return max(0.0, (machine_busy_seconds() - busy0 - ours) / (time.monotonic() - t0))

        return other

    def _measurement(self, first: float, last: float, cpu: float, sent: int) -> Measurement:
        count = self.params["messages"]
        seconds = last - first
        return Measurement(
            throughput=(count - 1) / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            count=count,
            extra={"cpu_cores": cpu / seconds if seconds > 0 else 0.0,
                   "cpu_us_per_msg": cpu / sent * 1e6 if sent else 0.0},
        )

    def measure_postier(self, r: int, delivery_processes: int | None = None) -> Measurement:
        """``postier serve`` with its default number of delivery processes (None: one on
        a machine with two cores or more), or with ``--delivery-processes N``."""
        count = self.params["messages"]
        data_dir = copy_dir(self.filled, self.ctx.workdir / f"delivery-r{r}-d{delivery_processes}")
        server = PostierServer(
            self.ctx, data_dir, delivery=True,
            # Only delivery in the server's own process shows in its profile.
            profile_name=f"{self.name}-postier" if r == 0 and delivery_processes == 0 else None,
            args=None if delivery_processes is None
            else ["--delivery-processes", str(delivery_processes)])
        base = self.sink.count
        spawned = time.monotonic()
        try:
            server.start()
            pids = [server.process.pid, *child_pids(server.process.pid)]

            def used() -> float:
                return sum(cpu_seconds(pid) for pid in pids)

            cpu0, at0 = used(), self.sink.count
            window = self._window()
            first, last = self._drained(base, server.process)
            cpu = used() - cpu0
            other = window(cpu)
            settled = wait_settled(server.url, self.token)
        finally:
            server.stop()
        m = self._measurement(first, last, cpu, base + count - at0)
        m.extra["other_cpu_cores"] = other
        m.extra["start_to_first_s"] = first - spawned
        m.extra["settled_after_last_s"] = settled - last
        counts = status_counts(data_dir / "postier.db")
        if counts.get("sent") != count:
            m.notes.append(f"statuses after the drain: {counts}")
        if r == 0 and self.ctx.profile_dir is not None:
            m.notes.append("profiled with py-spy (slower)")
        return m

    def measure_baseline(self, r: int, loop: str = "asyncio") -> Measurement:
        argv = [PYTHON, str(BENCH_DIR / "smtp_blast.py"), "--db",
                str(self.filled / "postier.db"), "--port", str(self.sink.port),
                "--concurrency", str(self.params["connections"]), "--loop", loop]
        log_path = self.ctx.workdir / f"smtp-blast-r{r}-{loop}.log"
        log_path.unlink(missing_ok=True)
        base = self.sink.count
        proc = Process(argv, log_path).start()
        try:
            window = self._window()
            cpu0 = cpu_seconds(proc.pid)
            first, last = self._drained(base, proc)
            try:
                other: float | None = window(cpu_seconds(proc.pid) - cpu0)
            except FileNotFoundError:  # it had already finished
                other = None
            if proc.proc is not None:
                proc.proc.wait(30)
        finally:
            proc.stop()
        summary = json.loads(log_path.read_text().strip().splitlines()[-1])
        m = self._measurement(first, last, summary["cpu_seconds"], summary["sent"])
        if other is not None:
            m.extra["other_cpu_cores"] = other
        if summary.get("errors"):
            m.notes.append(f"errors: {summary['errors']}")
        return m

    def systems(self) -> list[System]:
        c = self.params["connections"]
        return [
            System("postier", "postier", self.measure_postier,
                   f"postier serve with its defaults (on two cores or more: one delivery "
                   f"process), {c} relay connections"),
            System("postier-inproc", "postier",
                   lambda r: self.measure_postier(r, delivery_processes=0),
                   f"postier serve --delivery-processes 0: delivery in the server's own "
                   f"process (the default on one core), {c} relay connections"),
            System("postier-2proc", "postier",
                   lambda r: self.measure_postier(r, delivery_processes=2),
                   f"postier serve --delivery-processes 2: two delivery processes, {c} "
                   "relay connections each"),
            System("aiosmtplib", "baseline", self.measure_baseline,
                   f"raw aiosmtplib, same bytes, {c} reused connections, asyncio loop"),
            System("aiosmtplib-uvloop", "baseline",
                   lambda r: self.measure_baseline(r, "uvloop"),
                   "the same on uvloop (for reference; the ratio uses the asyncio loop)"),
        ]

    def ratios(self) -> list[Ratio]:
        return [Ratio("Postier / Python ceiling (aiosmtplib)", "postier", "aiosmtplib",
                      target=0.80),
                Ratio("Postier, delivery in the server's process / Python ceiling",
                      "postier-inproc", "aiosmtplib", target=0.80),
                Ratio("Postier, 2 delivery processes / Python ceiling", "postier-2proc",
                      "aiosmtplib", target=0.80)]


SCENARIO = Delivery
