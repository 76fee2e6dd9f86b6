"""The HTTP servers the acceptance scenarios load: Postier and the baseline apps.

Each target is started fresh for one measurement (Postier on a copy of a provisioned data
directory, so every round starts from the same state), loaded, stopped, and then checked:
an acceptance that answered 202 must be in the store.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import (
    BENCH_DIR,
    PYTHON,
    BenchError,
    Context,
    Measurement,
    PostierServer,
    Process,
    copy_dir,
    free_port,
    percentile,
    status_counts,
    wait_http,
)
from loadgen import LoadResult, run_async, run_load


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the delivery children of ``postier serve
    --delivery-processes``), so that their CPU counts as Postier's."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all cores of the machine spent busy so far (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Load:
    """What to send: warm-up requests (not measured), then the measured ones."""

    path: str
    warmup: Sequence[bytes]
    requests: Sequence[bytes]
    concurrency: int
    messages_per_request: int = 1
    timeout: float = 60.0
    deadline: float = 600.0


def _measure(url: str, pid: int, load: Load) -> tuple[LoadResult, Measurement]:
    if load.warmup:
        warm = run_async(lambda: run_load(url, load.warmup, concurrency=load.concurrency,
                                          request_timeout=load.timeout, deadline=load.deadline))
        if warm.errors:
            raise BenchError(f"warm-up failed: {warm.errors} {warm.sample_error}")
    # The server's CPU is its own and its children's (``--http-processes``).
    pids = [pid, *child_pids(pid)]
    cpu0 = [cpu_seconds(p) for p in pids]
    client_cpu0, busy0 = own_cpu_seconds(), machine_busy_seconds()
    res = run_async(lambda: run_load(url, load.requests, concurrency=load.concurrency,
                                     request_timeout=load.timeout, deadline=load.deadline))
    by_process = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
    server_cpu = sum(by_process)
    client_cpu = own_cpu_seconds() - client_cpu0
    other = machine_busy_seconds() - busy0 - server_cpu - client_cpu
    lat = sorted(res.latencies)
    messages = res.ok * load.messages_per_request
    m = Measurement(
        throughput=messages / res.seconds if res.seconds else 0.0,
        seconds=res.seconds,
        count=messages,
        extra={
            "requests_per_s": res.ok / res.seconds if res.seconds else 0.0,
            "p50_ms": percentile(lat, 50) * 1000,
            "p99_ms": percentile(lat, 99) * 1000,
            "max_ms": (lat[-1] if lat else float("nan")) * 1000,
            "errors": float(sum(res.errors.values())),
            "server_cpu_cores": server_cpu / res.seconds if res.seconds else 0.0,
            "server_cpu_us_per_msg": server_cpu / messages * 1e6 if messages else 0.0,
            # Each process's share (the server first, then its children), in cores.
            **({f"process{i}_cpu_cores": c / res.seconds for i, c in enumerate(by_process)}
               if len(pids) > 1 and res.seconds else {}),
            "loadgen_cpu_cores": client_cpu / res.seconds if res.seconds else 0.0,
            # Everything else on the machine (other people's work, the kernel's): the
            # noise of this measurement.
            "other_cpu_cores": max(0.0, other / res.seconds) if res.seconds else 0.0,
        },
    )
    if res.errors:
        m.notes.append(f"errors {res.errors}: {res.sample_error}")
    return res, m


def measure_postier(ctx: Context, template: Path, dir_name: str, load: Load,
                    profile_name: str | None, http_processes: int = 1) -> Measurement:
    """Postier with delivery off: only acceptance (validation, policy, rendering, the
    durable group commit) is measured; by one process, or by ``http_processes``."""
    data_dir = copy_dir(template, ctx.workdir / dir_name)
    args = ["--http-processes", str(http_processes)] if http_processes > 1 else []
    server = PostierServer(ctx, data_dir, delivery=False, profile_name=profile_name,
                           args=args)
    try:
        server.start()
        wait_log(server, [f"HTTP process {i} answering" for i in range(1, http_processes)])
        _, m = _measure(server.url, server.process.pid, load)
    finally:
        server.stop()
    stored = sum(status_counts(data_dir / "postier.db").values())
    expected = (len(load.warmup) + len(load.requests)) * load.messages_per_request
    accepted = m.count + len(load.warmup) * load.messages_per_request
    if stored != accepted:
        m.notes.append(f"{accepted} acceptances answered but {stored} messages stored")
    elif stored != expected:
        m.notes.append(f"{expected - stored} messages refused")
    if profile_name and ctx.profile_dir is not None:
        m.notes.append("profiled with py-spy (slower)")
    return m


def wait_log(server: PostierServer, lines: Sequence[str], timeout: float = 60.0) -> None:
    """Until the server's log holds every line (its HTTP children have started)."""
    deadline = time.monotonic() + timeout
    while lines:
        text = (server.data_dir / "server.log").read_text(errors="replace")
        if all(line in text for line in lines):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"postier serve did not log {lines} within {timeout} s")
        time.sleep(0.1)


def measure_baseline(ctx: Context, mode: str, name: str, load: Load,
                     loop: str = "auto") -> Measurement:
    port = free_port()
    argv = [PYTHON, str(BENCH_DIR / "baseline_app.py"), "--mode", mode, "--port", str(port),
            "--loop", loop]
    db = ctx.workdir / f"{name}.db"
    if mode == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        argv += ["--db", str(db)]
    proc = Process(argv, ctx.workdir / f"{name}.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/api/v1/health", proc)
        _, m = _measure(url, proc.pid, load)
    finally:
        proc.stop()
    if mode == "sqlite":
        with contextlib.closing(sqlite3.connect(db)) as conn:
            (stored,) = conn.execute("SELECT count(*) FROM messages").fetchone()
        accepted = m.count + len(load.warmup) * load.messages_per_request
        if stored != accepted:
            m.notes.append(f"{accepted} acceptances answered but {stored} rows stored")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    return m
