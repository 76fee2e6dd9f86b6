"""``queue_scale``: does a big queue make Postier slower or fatter?

Two data directories are prepared, one with 10,000 and one with 1,000,000 due e-mails
already queued (100,000 with ``--quick``): a few real e-mails are accepted through the
batch API, then copied row by row with one bulk SQL insert (same columns, bodies of
2 KiB, recipients; new ids, older dates), which takes a minute instead of the hours the API
would. Then, on each, alternately:

- ``single``: ``POST /api/v1/messages`` from 50 clients (as ``api_single``);
- ``batch``: ``POST /api/v1/messages/batch`` of 1,000 (as ``api_batch``);
- ``claim``: the delivery workers' claim query (``SQLStore.claim`` of 64 due messages,
  as ``postier serve`` runs it) repeated, timed in a separate process, then released;
- ``deliver``: ``postier serve`` with delivery on, until the sink has received a fixed
  number of e-mails from the big queue.

The figure for each is messages per second; the ratios 1M / 10k are the inverse of the
cost ratio the project tracks (cost ≤ 1.3 × ⇔ ratio ≥ 0.77). The server's peak resident
memory (``VmHWM`` of ``/proc/PID/status``) is recorded for every server run.

The directories are not copied between rounds (1,000,000 rows are 2 GB): the measurements
add and deliver a few thousand messages each, which changes neither size noticeably.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
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
)
from loadgen import build_request, run_async, run_load
from targets import Load, _measure, child_pids, cpu_seconds

ORDER = 60
SINGLE = "/api/v1/messages"
BATCH = "/api/v1/messages/batch"


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def bulk_fill(db_path: Path, total: int) -> float:
    """Copy the queued messages of a stopped server's SQLite file until ``total`` are
    queued: one transaction, plain ``executemany``; returns the seconds it took."""
    t0 = time.monotonic()
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.execute("PRAGMA synchronous=OFF")
        cur = db.execute("SELECT * FROM messages WHERE status = 'queued' LIMIT 1")
        columns = [d[0] for d in cur.description]
        seed = cur.fetchone()
        if seed is None:
            raise BenchError("no queued message to copy")
        seed_id = seed[columns.index("id")]
        (have,) = db.execute("SELECT count(*) FROM messages WHERE status = 'queued'").fetchone()
        body = db.execute("SELECT data FROM message_bodies WHERE message_id = ?",
                          (seed_id,)).fetchone()[0]
        rcur = db.execute("SELECT * FROM recipients WHERE message_id = ?", (seed_id,))
        rcolumns = [d[0] for d in rcur.description]
        rseed = rcur.fetchall()
        n = total - have
        now = time.time()
        base_ms = int((now - 86400) * 1000)  # ids sort before anything accepted later
        at = {c: columns.index(c) for c in ("id", "message_id", "created_at", "updated_at",
                                            "next_attempt_at", "idempotency_key")}

        def messages(i0: int, i1: int) -> list[tuple[object, ...]]:
            rows = []
            for i in range(i0, i1):
                row = list(seed)
                when = now - 86400 + i * 86400 / max(n, 1)
                row[at["id"]] = f"{base_ms + i // 1000:012x}{i:020x}"
                row[at["message_id"]] = f"<bench.{i}@ac-lyon.fr>"
                row[at["created_at"]] = row[at["updated_at"]] = when
                row[at["next_attempt_at"]] = when
                row[at["idempotency_key"]] = None
                rows.append(tuple(row))
            return rows

        rid = rcolumns.index("message_id")
        mq = f"INSERT INTO messages ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        rq = (f"INSERT INTO recipients ({', '.join(rcolumns)}) "
              f"VALUES ({', '.join('?' * len(rcolumns))})")
        step = 50_000
        for i0 in range(0, n, step):
            rows = messages(i0, min(n, i0 + step))
            db.executemany(mq, rows)
            db.executemany("INSERT INTO message_bodies (message_id, data) VALUES (?, ?)",
                           ((r[at["id"]], body) for r in rows))
            db.executemany(rq, (tuple(r[at["id"]] if k == rid else v
                                      for k, v in enumerate(rrow))
                                for r in rows for rrow in rseed))
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("ANALYZE")
    return time.monotonic() - t0


class QueueScale(Scenario):
    name = "queue_scale"
    description = "acceptance, claims and delivery with 10k vs 1M e-mails queued; peak RSS"

    def prepare(self) -> None:
        quick = self.ctx.quick
        big = 100_000 if quick else 1_000_000
        self.sizes = {"10k": 10_000, "1M" if not quick else "100k": big}
        self.params = {"queued": dict(self.sizes), "single_requests": 500 if quick else 2000,
                       "batches": 3 if quick else 10, "batch_size": 1000, "concurrency": 50,
                       "claims": 20 if quick else 50, "claim_limit": 64,
                       "deliver": 1000 if quick else 5000, "body_bytes": 2048}
        self.sink = Sink(self.ctx.workdir, prefer_python=self.ctx.python_sink)
        self.sink.start()
        self.on_close(self.sink.stop)
        template, token = make_template(self.ctx, self.name, self.sink.port)
        body = text_body(self.params["body_bytes"])
        self.dirs: dict[str, Path] = {}
        for label, size in self.sizes.items():
            data_dir = copy_dir(template, self.ctx.workdir / f"{self.name}-{label}")
            seed = [build_request("http://127.0.0.1", BATCH, json.dumps(
                {"messages": [message_json(i, body) for i in range(100)]}).encode(), token)]
            server = PostierServer(self.ctx, data_dir, delivery=False).start()
            try:
                run_async(lambda seed=seed, server=server: run_load(  # type: ignore[misc]
                    server.url, seed, concurrency=1, request_timeout=60.0))
            finally:
                server.stop()
            took = bulk_fill(data_dir / "postier.db", size)
            counts = status_counts(data_dir / "postier.db")
            if counts != {"queued": size}:
                raise BenchError(f"filling {label} gave {counts}")
            log(f"{self.name}: {size:,} e-mails queued in {label} ({took:.0f} s)")
            self.params[f"fill_{label}_s"] = round(took, 1)
            self.dirs[label] = data_dir
        n, w = self.params["single_requests"], 200
        singles = [build_request("http://127.0.0.1", SINGLE,
                                 json.dumps(message_json(i, body)).encode(), token)
                   for i in range(n + w)]
        self.single = Load(SINGLE, singles[:w], singles[w:], self.params["concurrency"])
        size = self.params["batch_size"]
        batches = [build_request("http://127.0.0.1", BATCH, json.dumps(
            {"messages": [message_json(b * size + i, body) for i in range(size)]}).encode(),
            token) for b in range(self.params["batches"] + 1)]
        self.batch = Load(BATCH, batches[:1], batches[1:], 2, messages_per_request=size,
                          timeout=120.0)

    # -- the measurements --------------------------------------------------------------------
    def _accept(self, label: str, load: Load) -> Measurement:
        server = PostierServer(self.ctx, self.dirs[label], delivery=False)
        t0 = time.monotonic()
        try:
            server.start()
            started = time.monotonic() - t0
            _, m = _measure(server.url, server.process.pid, load)
            m.extra["server_peak_rss_mb"] = peak_rss_mb(server.process.pid)
            m.extra["start_s"] = started
        finally:
            server.stop()
        return m

    def _claim(self, label: str) -> Measurement:
        p = self.params
        log_path = self.ctx.workdir / f"claim-{label}.log"
        log_path.unlink(missing_ok=True)
        proc = Process([PYTHON, str(BENCH_DIR / "claim_probe.py"), "--data-dir",
                        str(self.dirs[label]), "--claims", str(p["claims"]), "--limit",
                        str(p["claim_limit"])], log_path).start()
        assert proc.proc is not None
        try:
            code = proc.proc.wait(600)
        finally:
            proc.stop()
        if code != 0:
            raise BenchError(f"claim probe failed:\n{proc.log_tail()}")
        out = json.loads(log_path.read_text().strip().splitlines()[-1])
        if out["claimed"] != p["claims"] * p["claim_limit"]:
            raise BenchError(f"the claim probe took {out['claimed']} messages, not "
                             f"{p['claims'] * p['claim_limit']}")
        return Measurement(
            throughput=out["claimed"] / out["total_s"], seconds=out["total_s"],
            count=out["claimed"],
            extra={"claim_median_ms": out["median_ms"], "claim_p90_ms": out["p90_ms"]})

    def _deliver(self, label: str) -> Measurement:
        count = self.params["deliver"]
        server = PostierServer(self.ctx, self.dirs[label], delivery=True)
        base = self.sink.count
        try:
            server.start()
            # With its defaults on two cores, the server delivers in a child process: its
            # CPU and memory are the server's too.
            pids = [server.process.pid, *child_pids(server.process.pid)]
            cpu0 = sum(cpu_seconds(pid) for pid in pids)
            if not self.sink.wait_for(base + count, 120 + count / 20,
                                      alive=server.process.alive):
                raise BenchError(f"only {self.sink.count - base} of {count} e-mails reached "
                                 f"the sink\n{server.process.log_tail(10)}")
            first, last = self.sink.arrival(base + 1), self.sink.arrival(base + count)
            cpu = sum(cpu_seconds(pid) for pid in pids) - cpu0
            rss = sum(peak_rss_mb(pid) for pid in pids)
        finally:
            server.stop()
        seconds = last - first
        return Measurement(throughput=(count - 1) / seconds, seconds=seconds, count=count,
                           extra={"server_cpu_cores": cpu / seconds,
                                  "server_peak_rss_mb": rss})

    def systems(self) -> list[System]:
        out = []
        for kind, how in (("single", lambda lb: self._accept(lb, self.single)),
                          ("batch", lambda lb: self._accept(lb, self.batch)),
                          ("claim", self._claim), ("deliver", self._deliver)):
            for label in self.sizes:
                out.append(System(f"{kind}-{label}", "postier",
                                  lambda r, how=how, label=label: how(label),
                                  f"{kind} with {self.sizes[label]:,} e-mails queued"))
        return out

    def ratios(self) -> list[Ratio]:
        small, big = list(self.sizes)
        return [Ratio(f"{kind}: {big} / {small} (cost ratio ≤ 1.3 ⇔ ≥ 0.77)",
                      f"{kind}-{big}", f"{kind}-{small}", target=1 / 1.3)
                for kind in ("single", "batch", "claim", "deliver")]


SCENARIO = QueueScale
