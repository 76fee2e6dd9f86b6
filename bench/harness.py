"""What every benchmark scenario shares: processes, ports, the SMTP sink, statistics.

A scenario (one module in ``bench/scenarios/``) subclasses :class:`Scenario`: it prepares
what it needs once, then names the systems it measures (Postier and its baselines), each a
function that runs one measurement and returns a :class:`Measurement`. The runner measures
every system once per round, in a rotating order so that no system always runs first (or
on a warmer disk cache), and summarises the rounds as median and min–max.

Everything runs on 127.0.0.1, is bounded in count and time, and every process started here
is stopped here.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = sys.executable

SMTP_SINK = "/usr/sbin/smtp-sink"
SENDER_DOMAIN = "ac-lyon.fr"
BENCH_USER = "bench"
BENCH_EMAIL = f"bench.user@{SENDER_DOMAIN}"


class BenchError(RuntimeError):
    """A measurement could not be made; the message says why."""


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- results ------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One system measured once: its throughput and whatever else it observed."""

    throughput: float  # messages per second
    seconds: float  # the measured interval
    count: int  # messages in that interval
    extra: dict[str, float] = field(default_factory=dict)  # p50_ms, p99_ms, ...
    notes: list[str] = field(default_factory=list)


@dataclass
class System:
    """Something a scenario measures: Postier, or a baseline."""

    label: str
    kind: str  # "postier" or "baseline"
    measure: Callable[[int], Measurement]  # round number -> one measurement
    description: str = ""


@dataclass
class Ratio:
    """A figure the report states: numerator's median throughput / denominator's."""

    label: str
    numerator: str
    denominator: str
    target: float | None = None


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(q / 100 * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# -- the scenario interface -----------------------------------------------------------------


@dataclass
class Context:
    """What the runner gives a scenario."""

    workdir: Path  # a private temporary directory, removed at the end
    quick: bool
    rounds: int
    profile_dir: Path | None = None  # set by --profile: py-spy the Postier server
    env: dict[str, str] = field(default_factory=dict)  # POSTIER_* passed to the server
    python_sink: bool = False  # use bench/pysink.py even if smtp-sink is there
    quiet_wait: float = 0.0  # wait up to this long for an idle machine before measuring


class Scenario:
    """One benchmark. Subclasses set ``name``/``description`` and implement the hooks."""

    name = ""
    description = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.params: dict[str, Any] = {}
        self._cleanups: list[Callable[[], None]] = []

    def prepare(self) -> None:
        """Build what every round needs (templates, sinks); not timed."""

    def systems(self) -> list[System]:
        raise NotImplementedError

    def ratios(self) -> list[Ratio]:
        return []

    def on_close(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def close(self) -> None:
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                fn()
            except Exception as exc:
                log(f"cleanup of {self.name} failed: {exc}")


# -- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A child process with its output in a log file; stopped by SIGTERM, then SIGKILL."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.argv[0]} ignored SIGTERM for {timeout:.0f} s; killing it")
                self.proc.kill()
                self.proc.wait(10)
        code = self.proc.returncode
        self.proc = None
        return code


def wait_http(url: str, proc: Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.argv[:3]} exited at start-up:\n{proc.log_tail()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise BenchError(f"{url} did not answer within {timeout:.0f} s:\n{proc.log_tail()}")


# -- Postier ---------------------------------------------------------------------------------


def postier_cli(*args: str, timeout: float = 60.0) -> str:
    res = subprocess.run(
        [PYTHON, "-m", "postier", *args], capture_output=True, text=True, timeout=timeout,
        check=False,
    )
    if res.returncode != 0:
        raise BenchError(f"postier {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res.stdout


def relay_settings(sink_port: int) -> dict[str, Any]:
    return {
        "delegation": True,
        "sender": {"name": "Collège Banc d'essai", "address": f"ne-pas-repondre@{SENDER_DOMAIN}"},
        "allowed_domains": [SENDER_DOMAIN],
        "relay": {"host": "127.0.0.1", "port": sink_port, "security": "none", "auth": "none",
                  "timeout": 30},
        "retry": {"first_delay": 1, "max_delay": 2, "max_age": 3600},
    }


class PostierServer:
    """``postier serve`` as an operator runs it, on a data directory of its own."""

    def __init__(self, ctx: Context, data_dir: Path, *, delivery: bool,
                 env: dict[str, str] | None = None, profile_name: str | None = None,
                 args: list[str] | None = None, database_url: str | None = None) -> None:
        self.ctx = ctx
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [PYTHON, "-m", "postier", "serve", "--data-dir", str(data_dir),
                "--http", f"127.0.0.1:{self.port}"]
        if database_url:
            argv += ["--database-url", database_url]
        if not delivery:
            argv.append("--no-delivery")
        argv += args or []
        # SMTP submission is off unless a scenario asks for it: its default port (2587)
        # would collide with any other Postier running on the machine.
        # The submission pace (recipients per account and establishment a minute and a
        # day) is far below a benchmark's load: lifted high, so its code still runs (one
        # reservation in the database per 1,000 recipients and process).
        env = {"POSTIER_SMTP": "off", **PACE_LIFTED, **ctx.env, **(env or {})}
        self.process = Process(argv, data_dir / "server.log", env=env)
        self.profile_name = profile_name
        self._profiler: Process | None = None

    def start(self) -> PostierServer:
        self.process.start()
        wait_http(self.url + "/api/v1/health", self.process)
        if self.ctx.profile_dir is not None and self.profile_name:
            self._profiler = start_profiler(self.ctx.profile_dir, self.profile_name,
                                            self.process.pid, self.ctx.workdir)
        return self

    def stop(self) -> None:
        code = self.process.stop()
        if self._profiler is not None:
            # py-spy writes its file when its target exits.
            stop_profiler(self._profiler)
            self._profiler = None
            assert self.ctx.profile_dir is not None
            raw = self.ctx.profile_dir / f"{self.profile_name}.txt"
            if raw.exists():
                raw.with_suffix(".txt.gz").write_bytes(gzip.compress(raw.read_bytes()))
                raw.unlink()
        if code not in (0, None):
            log(f"postier serve exited with status {code}:\n{self.process.log_tail()}")


def start_profiler(profile_dir: Path, name: str, pid: int, log_dir: Path) -> Process | None:
    spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(spy).exists():
        log("--profile: py-spy is not installed (.venv/bin/pip install py-spy); no profile")
        return None
    profile_dir.mkdir(parents=True, exist_ok=True)
    out = profile_dir / f"{name}.txt"
    proc = Process(
        # --gil: only the thread holding the GIL is sampled, so the profile says where
        # the Python CPU time goes (the server is one process bound by its GIL).
        # POSTIER_BENCH_SPY_RATE: samples a second (100; more for a short measurement).
        [spy, "record", "--pid", str(pid), "--rate",
         os.environ.get("POSTIER_BENCH_SPY_RATE", "100"), "--format", "raw", "--gil",
         "--output", str(out)],
        log_dir / f"py-spy-{name}.log",
    ).start()
    time.sleep(0.5)  # let it attach before the load starts
    return proc


def stop_profiler(proc: Process) -> None:
    if proc.proc is None:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.proc.wait(20)
    if proc.alive():
        proc.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.proc.wait(20)
    proc.stop(5)


def make_template(ctx: Context, name: str, sink_port: int = 25,
                  database_url: str | None = None) -> tuple[Path, str]:
    """A provisioned, configured data directory (user, token, relay settings), made once
    and copied for every measurement so that each starts from the same state. With
    ``database_url`` (PostgreSQL) the data directory holds only the secret key, and the
    database is the template to copy (:func:`pg_create` with ``template``)."""
    data_dir = ctx.workdir / f"template-{name}"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    where = ["--data-dir", str(data_dir)]
    if database_url:
        where += ["--database-url", database_url]
    postier_cli("users", "add", BENCH_USER, "--email", BENCH_EMAIL, "--name", "Banc d'essai",
                "--role", "admin", *where)
    token = postier_cli("tokens", "create", BENCH_USER, *where).strip().splitlines()[-1]
    server = PostierServer(ctx, data_dir, delivery=False, database_url=database_url).start()
    try:
        r = httpx.put(server.url + "/api/v1/settings", json=relay_settings(sink_port),
                      headers={"Authorization": f"Bearer {token}"}, timeout=30)
        if r.status_code != 200:
            raise BenchError(f"PUT /api/v1/settings answered {r.status_code}: {r.text}")
    finally:
        server.stop()
    with contextlib.suppress(FileNotFoundError):
        (data_dir / "server.log").unlink()
    return data_dir, token


def wait_settled(url: str, token: str, timeout: float = 60.0) -> float:
    """When no message is left queued or sending, as the API reports it."""
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        while time.monotonic() < deadline:
            waiting = [client.get("/api/v1/messages", params={"status": s, "limit": 1}).json()
                       for s in ("queued", "sending")]
            if not any(waiting):
                return time.monotonic()
            time.sleep(0.05)
    raise BenchError(f"messages still queued or sending {timeout:.0f} s after the last "
                     "one reached the sink")


def copy_dir(template: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(template, dest)
    return dest


def status_counts(db_path: Path | str) -> dict[str, int]:
    """Messages per status, read from a stopped server's SQLite file, or from a PostgreSQL
    database given by URL (a check, not a measurement)."""
    sql = "SELECT status, count(*) FROM messages GROUP BY status"
    if isinstance(db_path, str) and db_path.startswith("postgresql"):
        return {k: int(v) for k, v in (line.split("|") for line in pg_query(db_path, sql))}
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        return dict(db.execute(sql).fetchall())


# -- PostgreSQL ------------------------------------------------------------------------------

PACE_LIFTED = {f"POSTIER_PACE_{limit}": "1000000000" for limit in (
    "ACCOUNT_PER_MINUTE", "ACCOUNT_PER_DAY", "ESTABLISHMENT_PER_MINUTE", "ESTABLISHMENT_PER_DAY")}
PG_ADMIN = os.environ.get("POSTIER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_query(url: str, sql: str) -> list[str]:
    """Run one statement with psql; its rows as ``a|b`` lines."""
    if not shutil.which("psql"):
        raise BenchError("psql is needed for the PostgreSQL scenarios (package "
                         "postgresql-client)")
    res = subprocess.run(["psql", url, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
                          "-c", sql], capture_output=True, text=True, timeout=600, check=False)
    if res.returncode != 0:
        raise BenchError(f"psql {sql!r} failed: {res.stderr.strip()}")
    return [line for line in res.stdout.splitlines() if line]


def pg_url(name: str) -> str:
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def pg_create(name: str, template: str | None = None) -> str:
    """A fresh database (a copy of ``template`` if given); its URL."""
    pg_drop(name)
    pg_query(PG_ADMIN, f'CREATE DATABASE "{name}"'
             + (f' TEMPLATE "{template}"' if template else ""))
    return pg_url(name)


def pg_drop(name: str) -> None:
    pg_query(PG_ADMIN, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the SMTP sink ---------------------------------------------------------------------------


def ensure_smtp_sink() -> bool:
    """Postfix's ``smtp-sink``, installed from Debian's package if missing and possible."""
    if Path(SMTP_SINK).exists():
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log("smtp-sink is missing and cannot be installed here (needs root and apt-get)")
        return False
    log("installing postfix (for smtp-sink) with apt-get; its daemon is not needed")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postfix"]):
        try:
            res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600,
                                 check=False)
        except subprocess.TimeoutExpired:
            log(f"{' '.join(argv)} took more than 10 minutes; giving up")
            return False
        if res.returncode != 0:
            log(f"{' '.join(argv)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
            return False
    return Path(SMTP_SINK).exists()


_COUNTER = re.compile(rb"mesg=(\d+)")


class Sink:
    """An SMTP server that counts and discards: Postfix's ``smtp-sink`` (C, one process,
    never the bottleneck), or ``bench/pysink.py`` when smtp-sink cannot be had.

    Both print ``sess=.. quit=.. mesg=N`` counters; a thread reads them and records when
    each message arrived, so a measurement is "first to last message received"."""

    def __init__(self, workdir: Path, prefer_python: bool = False) -> None:
        self.port = free_port()
        self.kind = "python" if prefer_python or not ensure_smtp_sink() else "smtp-sink"
        if self.kind == "smtp-sink":
            argv = [SMTP_SINK, "-c", "-m", "1000"]
            if os.geteuid() == 0:
                argv += ["-u", "root"]
            argv += [f"127.0.0.1:{self.port}", "1000"]
        else:
            log("using the Python sink bench/pysink.py: it may be the bottleneck")
            argv = [PYTHON, str(BENCH_DIR / "pysink.py"), "--port", str(self.port)]
        self.argv = argv
        self.count = 0
        self._times: list[float] = []  # arrival time of message i+1 (monotonic)
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stderr = workdir / f"sink-{self.port}.log"

    def start(self) -> Sink:
        with self._stderr.open("ab") as err:
            self._proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=err,
                                          start_new_session=True)
        self._thread = threading.Thread(target=self._read, name="sink-counter", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BenchError(f"the SMTP sink exited: {self._stderr.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=1
            ) as s:
                s.recv(100)  # the greeting
                return self
            time.sleep(0.05)
        raise BenchError("the SMTP sink did not start")

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            now = time.monotonic()
            tail = (tail + chunk)[-200:]
            found = _COUNTER.findall(tail)
            if not found:
                continue
            n = int(found[-1])
            tail = tail[tail.rfind(b"mesg=") + 5:]
            with self._cond:
                if n > self.count:
                    # Messages between two reads share the read's timestamp (reads happen
                    # every few microseconds under load).
                    self._times.extend([now] * (n - self.count))
                    self.count = n
                    self._cond.notify_all()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def wait_for(self, target: int, timeout: float, alive: Callable[[], bool] | None = None
                 ) -> bool:
        """Wait until ``target`` messages have arrived in total."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if alive is not None and not alive():
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def arrival(self, index: int) -> float:
        """When message number ``index`` (1-based, counted since the sink started) arrived."""
        with self._cond:
            return self._times[index - 1]

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(10)
        if self._thread is not None:
            self._thread.join(5)
        self._proc = None


def busy_cores(interval: float = 1.0) -> float:
    """How many cores the whole machine keeps busy over ``interval`` seconds."""

    def busy() -> tuple[float, float]:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, idle, iowait, irq, softirq, steal = fields
        return user + nice + system + irq + softirq + steal, idle + iowait

    b0, i0 = busy()
    time.sleep(interval)
    b1, i1 = busy()
    total = (b1 - b0) + (i1 - i0)
    return (b1 - b0) / total * (os.cpu_count() or 1) if total else 0.0


def wait_for_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (at most ``max_wait`` s) until the machine is nearly idle, since a benchmark
    on a shared machine measures its neighbours too; return the last busy reading."""
    deadline = time.monotonic() + max_wait
    load = busy_cores()
    announced = False
    while load > threshold and time.monotonic() < deadline:
        if not announced:
            log(f"the machine is busy ({load:.1f} cores used by others); waiting up to "
                f"{max_wait:.0f} s for it to calm down")
            announced = True
        time.sleep(2)
        load = busy_cores()
    return load


# -- the request bodies ----------------------------------------------------------------------

_LINE = "Le conseil de classe du deuxième trimestre aura lieu jeudi à 17 h en salle B12. "


def text_body(size: int = 2048) -> str:
    """About ``size`` bytes of plain text in lines of under 80 characters."""
    out: list[str] = []
    total = 0
    while total < size:
        line = _LINE[: min(len(_LINE), size - total)].rstrip() or "."
        out.append(line)
        total += len(line.encode()) + 1
    return "\n".join(out)


def message_json(i: int, body: str) -> dict[str, Any]:
    return {"to": [f"parent.eleve{i}@example.org"], "subject": f"Conseil de classe n°{i}",
            "text": body}


# -- the machine -----------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return float("nan")


def _git(*args: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=False)
        return res.stdout.strip()
    return ""


def machine() -> dict[str, Any]:
    versions = {}
    for dist in ("postier", "fastapi", "uvicorn", "starlette", "pydantic", "sqlalchemy",
                 "aiosqlite", "aiosmtplib", "uvloop", "httptools", "httpx"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    postfix = ""
    if shutil.which("postconf"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            postfix = subprocess.run(["postconf", "-d", "-h", "mail_version"],
                                     capture_output=True, text=True, timeout=10,
                                     check=False).stdout.strip()
    dirty = _git("status", "--porcelain", "--", "src")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "sqlite": sqlite3.sqlite_version,
        "postfix": postfix,
        "packages": versions,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "src_modified_files": len(dirty.splitlines()) if dirty else 0,
    }


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


def to_jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj


def dump_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
