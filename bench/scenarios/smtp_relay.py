"""``smtp_relay``: SMTP in, SMTP out — Postier as a relay, against Postfix doing the same.

``smtp-source`` (Postfix's load generator) sends N messages of 2 KiB over 10 sessions that
each carry many messages into the relay under test, which forwards them to ``smtp-sink``.
A measurement is timed from the moment ``smtp-source`` starts until the sink has counted
every message: acceptance and delivery together, end to end, as a mail administrator
choosing between the two would see it. The acceptance rate (until ``smtp-source`` has had
its last ``250``) is reported beside it.

- **Postier**: ``postier serve --smtp 127.0.0.1:PORT --smtp-trusted-networks 127.0.0.0/8
  --smtp-trusted-account copieur`` (an application account, no AUTH), delivering to the
  sink with its defaults. Each ``250`` is answered once the message is committed
  (SQLite WAL, ``synchronous=FULL``; on PostgreSQL, a committed transaction).
- **Postfix**: a private instance of the Debian package's Postfix, started as root with its
  own configuration and queue directories in a temporary directory (``postfix -c DIR
  start``), listening only on 127.0.0.1, relaying everything from 127.0.0.0/8 to
  ``relayhost = [127.0.0.1]:SINK``, no local delivery; everything else is Postfix's
  defaults. Postfix answers ``250`` once its cleanup daemon has fsync'ed the queue file.

Each system gets a fresh queue for every measurement and is stopped right after it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from harness import (
    PYTHON,
    SENDER_DOMAIN,
    BenchError,
    Context,
    Measurement,
    PostierServer,
    Process,
    Ratio,
    Scenario,
    Sink,
    System,
    copy_dir,
    ensure_smtp_sink,
    free_port,
    make_template,
    postier_cli,
    start_profiler,
    status_counts,
    stop_profiler,
    wait_settled,
)
from targets import child_pids, cpu_seconds, machine_busy_seconds, own_cpu_seconds

ORDER = 40
SMTP_SOURCE = "/usr/sbin/smtp-source"
POSTFIX = "/usr/sbin/postfix"
APP_USER = "copieur"  # the application account trusted networks submit for
APP_EMAIL = f"copieur@{SENDER_DOMAIN}"
RECIPIENT = "parent.eleve@example.org"


def wait_smtp(port: int, alive: Process | None = None, timeout: float = 30.0) -> None:
    """Until something answers a 220 greeting on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive.alive():
            raise BenchError(f"{alive.argv[:3]} exited at start-up:\n{alive.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(
            ("127.0.0.1", port), timeout=2
        ) as s:
            if s.recv(100).startswith(b"220"):
                s.sendall(b"QUIT\r\n")
                return
        time.sleep(0.05)
    raise BenchError(f"nothing greeted on 127.0.0.1:{port} within {timeout:.0f} s")


# -- Postfix ---------------------------------------------------------------------------------

_MASTER_CF = """\
# service type private unpriv chroot wakeup maxproc command
{listen} inet n - n - - smtpd
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
proxywrite unix - - n -     1 proxymap
smtp      unix  - - n -     - smtp
relay     unix  - - n -     - smtp
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixRelay:
    """A private Postfix instance relaying 127.0.0.0/8 to the sink, for one measurement.

    Its configuration and queue live in a temporary directory of their own (world-
    traversable, as Postfix's unprivileged daemons need); it listens on 127.0.0.1 only,
    and :meth:`stop` stops it (``postfix stop``, then SIGKILL to its process group if it
    lingers) and removes the directory."""

    def __init__(self, sink_port: int) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="postier-bench-postfix-"))
        self.root.chmod(0o755)
        self.conf = self.root / "conf"
        self.queue = self.root / "queue"
        data = self.root / "data"
        for d in (self.conf, self.queue, data):
            d.mkdir()
        shutil.chown(data, "postfix")
        self.log_file = self.root / "postfix.log"
        (self.conf / "main.cf").write_text(textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {self.queue}
            data_directory = {data}
            myhostname = relais-banc.localdomain
            mydomain = localdomain
            myorigin = $myhostname
            # A pure relay: nothing is delivered locally.
            mydestination =
            local_recipient_maps =
            local_transport = error:local delivery is disabled
            alias_maps =
            alias_database =
            # Loopback only.
            inet_interfaces = 127.0.0.1
            inet_protocols = ipv4
            mynetworks = 127.0.0.0/8
            smtpd_relay_restrictions = permit_mynetworks, reject
            relayhost = [127.0.0.1]:{sink_port}
            maillog_file = {self.log_file}
            maillog_file_prefixes = {self.root}
            biff = no
            """))
        (self.conf / "master.cf").write_text(_MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        self.master_pid: int | None = None

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.conf), *args], capture_output=True,
                              text=True, timeout=120, check=False)

    def start(self) -> PostfixRelay:
        res = self._postfix("start")
        if res.returncode != 0:
            raise BenchError(f"postfix start failed ({res.returncode}): {res.stderr.strip()}"
                             f"\n{self.log_tail()}")
        pid_file = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(OSError, ValueError):
            self.master_pid = int(pid_file.read_text().split()[0])
        if self.master_pid is None:
            raise BenchError(f"Postfix did not write its master.pid\n{self.log_tail()}")
        wait_smtp(self.port)
        bound = listening_addresses(self.pids())
        if bound != {f"127.0.0.1:{self.port}"}:
            raise BenchError(f"Postfix listens on {sorted(bound)}, not only on its port")
        return self

    def pids(self) -> list[int]:
        """Every process of the instance (the master and its daemons share its session)."""
        if self.master_pid is None:
            return []
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == self.master_pid:  # session id
                    out.append(int(entry.name))
        return out

    def cpu_seconds(self) -> float:
        """CPU time of the instance so far: its live processes, plus the daemons that
        exited (counted in the master's children's time once it reaped them)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in self.pids():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += sum(int(f) for f in fields[11:15]) / tick
        return total

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def queued(self) -> int:
        """Messages still in the queue (files under active, incoming, deferred)."""
        return sum(1 for d in ("incoming", "active", "deferred", "hold", "maildrop")
                   if (self.queue / d).exists() for f in (self.queue / d).rglob("*")
                   if f.is_file())

    def stop(self) -> None:
        if self.master_pid is not None:
            self._postfix("stop")
            deadline = time.monotonic() + 15
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in self.pids():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self.master_pid = None
        shutil.rmtree(self.root, ignore_errors=True)


def worker_process(ctx: Context, data_dir: Path, url: str | None, i: int) -> Process:
    """A ``postier worker`` on the same database, with the server's secret key."""
    argv = [PYTHON, "-m", "postier", "worker", "--data-dir", str(data_dir / f"w{i}")]
    if url:
        argv += ["--database-url", url]
    env = {**ctx.env, "POSTIER_SECRET_KEY_FILE": str(data_dir / "secret.key")}
    return Process(argv, data_dir / f"worker-{i}.log", env=env)


def wait_delivering(logs: list[Path], timeout: float = 60.0) -> None:
    """Until every delivery worker these logs announce is running: a worker process's log
    says so once; a server's says so once per delivery process it started."""
    deadline = time.monotonic() + timeout
    for path in logs:
        while True:
            text = path.read_text(errors="replace") if path.exists() else ""
            started = text.count("started (pid") if path.name == "server.log" else 1
            if text.count(" running on ") >= started:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"no delivery worker running after {timeout:.0f} s "
                                 f"({path})")
            time.sleep(0.05)


def listening_addresses(pids: list[int]) -> set[str]:
    """The TCP addresses these processes listen on, as ``ip:port``."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                    continue
                addr, port = cols[1].split(":")
                if len(addr) == 8:
                    ip = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
                else:
                    ip = f"[{addr}]"
                found.add(f"{ip}:{int(port, 16)}")
    return found


# -- the scenario ----------------------------------------------------------------------------


class SmtpRelay(Scenario):
    name = "smtp_relay"
    description = ("smtp-source -> relay -> smtp-sink, 2 KiB, 10 sessions: Postier vs "
                   "Postfix")
    database = "sqlite"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.sink: Sink

    def prepare(self) -> None:
        ctx = self.ctx
        count = 1000 if ctx.quick else 10000
        self.params = {"messages": count, "sessions": 10, "body_bytes": 2048,
                       "timeout_s": 120 + count / 20, "database": self.database}
        if not ensure_smtp_sink() or not Path(SMTP_SOURCE).exists():
            raise BenchError("smtp-source and smtp-sink are needed (Debian package postfix)")
        self.sink = Sink(ctx.workdir, prefer_python=ctx.python_sink)
        self.sink.start()
        self.on_close(self.sink.stop)
        self.params["sink"] = self.sink.kind
        self.template, self.token = self._template()
        postier_cli("users", "add", APP_USER, "--email", APP_EMAIL, "--name",
                    "Copieur de la salle des professeurs", *self._where(self.template))

    def _template(self) -> tuple[Path, str]:
        return make_template(self.ctx, self.name, self.sink.port)

    def _where(self, data_dir: Path) -> list[str]:
        return ["--data-dir", str(data_dir)]

    # -- one measurement ---------------------------------------------------------------------
    def _source(self, port: int, label: str) -> Process:
        p = self.params
        # -d: each session sends its messages one after another over one connection.
        argv = [SMTP_SOURCE, "-c", "-d", "-l", str(p["body_bytes"]), "-m", str(p["messages"]),
                "-s", str(p["sessions"]), "-f", APP_EMAIL, "-t", RECIPIENT,
                f"127.0.0.1:{port}"]
        log_path = self.ctx.workdir / f"smtp-source-{label}.log"
        log_path.unlink(missing_ok=True)
        return Process(argv, log_path).start()

    def _run(self, port: int, label: str, relay_cpu: Callable[[], float],
             alive: Callable[[], bool]) -> Measurement:
        """Send the load through the relay on ``port``; time it until the sink has it all."""
        count = self.params["messages"]
        base = self.sink.count
        assert self.sink.pid is not None
        busy0, ours0 = machine_busy_seconds(), own_cpu_seconds()
        sink_cpu0, cpu0 = cpu_seconds(self.sink.pid), relay_cpu()
        t0 = time.monotonic()
        source = self._source(port, label)
        accepted_at: float | None = None  # when smtp-source had its last 250 and quit
        code: int | None = None
        try:
            deadline = t0 + self.params["timeout_s"]
            while not self.sink.wait_for(base + count, 0.02):
                if accepted_at is None and not source.alive():
                    accepted_at = time.monotonic()
                    assert source.proc is not None
                    if source.proc.returncode:  # some e-mails were refused: never all there
                        raise BenchError(f"smtp-source failed against {label}:\n"
                                         f"{source.log_tail(3)}")
                if not alive():
                    raise BenchError(f"{label} stopped during the load")
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"only {self.sink.count - base} of {count} e-mails reached the sink "
                        f"within {self.params['timeout_s']:.0f} s\n{source.log_tail(3)}")
            last = self.sink.arrival(base + count)
            assert source.proc is not None
            code = source.proc.wait(30)
            if accepted_at is None:
                accepted_at = time.monotonic()
        finally:
            source.stop()
        seconds = last - t0
        cpu = relay_cpu() - cpu0
        sink_cpu = cpu_seconds(self.sink.pid) - sink_cpu0
        elapsed = time.monotonic() - t0
        other = machine_busy_seconds() - busy0 - (own_cpu_seconds() - ours0) - cpu - sink_cpu
        accepted_s = min(accepted_at, last) - t0
        m = Measurement(
            throughput=count / seconds,
            seconds=seconds,
            count=count,
            extra={
                # Polled every 20 ms: the acceptance time is at most that late.
                "accepted_s": accepted_s,
                "accept_msg_per_s": count / accepted_s,
                "server_cpu_cores": cpu / seconds,
                "server_cpu_us_per_msg": cpu / count * 1e6,
                "sink_cpu_cores": sink_cpu / seconds,
                "other_cpu_cores": max(0.0, other / elapsed),
            },
        )
        if code != 0:
            m.notes.append(f"smtp-source exited with {code}: {source.log_tail(2)[-200:]}")
        return m

    def measure_postier(self, r: int, workers: int = 0,
                        delivery_processes: int | None = None) -> Measurement:
        """``postier serve`` delivering (``workers`` = 0) with its default number of
        delivery processes (one on two cores or more) or ``delivery_processes`` (0: in its
        own process), or accepting only with that many ``postier worker`` processes
        delivering (PostgreSQL)."""
        label = f"{self.name}-r{r}-w{workers}-d{delivery_processes}"
        data_dir = copy_dir(self.template, self.ctx.workdir / label)
        url = self.database_for(label)
        smtp_port = free_port()
        server = PostierServer(
            self.ctx, data_dir, delivery=workers == 0, database_url=url,
            profile_name=(f"{self.name}-postier{'-inproc' if delivery_processes == 0 else ''}"
                          f"{f'-{workers}w' if workers else ''}" if r == 0 else None),
            args=["--smtp", f"127.0.0.1:{smtp_port}", "--smtp-trusted-networks",
                  "127.0.0.0/8", "--smtp-trusted-account", APP_USER,
                  *(["--delivery-processes", str(delivery_processes)]
                    if delivery_processes is not None and workers == 0 else [])],
            # The per-account rate limit (600 a minute by default) is a policy, not a
            # cost: an administrator relaying an application's mailings raises it.
            env={"POSTIER_SMTP_RATE_PER_MINUTE": str(10 * self.params["messages"])})
        extra = [worker_process(self.ctx, data_dir, url, i) for i in range(workers)]
        profilers: list[Process | None] = []
        try:
            server.start()
            for w in extra:
                w.start()
            if r == 0 and self.ctx.profile_dir is not None:
                profilers = [start_profiler(self.ctx.profile_dir,
                                            f"{self.name}-{workers}w-worker{i}", w.pid,
                                            data_dir) for i, w in enumerate(extra)]
            wait_smtp(smtp_port, server.process)
            # Delivery processes and workers start beside the server: the load starts once
            # they are ready, or their start-up (imports, about a second of CPU each) would
            # be timed with it.
            wait_delivering([server.process.log_path] + [w.log_path for w in extra])
            pids = ([server.process.pid] + [w.pid for w in extra]
                    + child_pids(server.process.pid))

            def cpu() -> float:
                return sum(cpu_seconds(pid) for pid in pids)

            def alive() -> bool:
                return server.process.alive() and all(w.alive() for w in extra)

            m = self._run(smtp_port, f"postier-{label}", cpu, alive)
            m.extra["settled_after_last_s"] = (wait_settled(server.url, self.token)
                                               - self.sink.arrival(self.sink.count))
        finally:
            for w in extra:
                w.stop()
            for profiler in profilers:
                if profiler is not None:
                    stop_profiler(profiler)
            server.stop()
        counts = status_counts(url or data_dir / "postier.db")
        if counts != {"sent": self.params["messages"]}:
            m.notes.append(f"statuses after the run: {counts}")
        if r == 0 and self.ctx.profile_dir is not None:
            m.notes.append("profiled with py-spy (slower)")
        return m

    def database_for(self, label: str) -> str | None:
        """The database of one measurement: None for SQLite (in the data directory)."""
        return None

    def measure_postfix(self, r: int) -> Measurement:
        if os.geteuid() != 0 or not Path(POSTFIX).exists():
            raise BenchError("the Postfix baseline needs root and Postfix (Debian package "
                             "postfix): Postfix starts as root, then drops its privileges")
        postfix = PostfixRelay(self.sink.port)
        self.on_close(postfix.stop)  # in case anything below is interrupted
        try:
            postfix.start()
            m = self._run(postfix.port, f"postfix-r{r}", postfix.cpu_seconds,
                          lambda: bool(postfix.pids()))
            deadline = time.monotonic() + 10
            while postfix.queued() and time.monotonic() < deadline:
                time.sleep(0.1)
            if postfix.queued():
                m.notes.append(f"{postfix.queued()} files left in Postfix's queue")
        except BenchError as exc:
            raise BenchError(f"{exc}\n{postfix.log_tail()}") from exc
        finally:
            postfix.stop()
        return m

    def systems(self) -> list[System]:
        return [
            System("postier", "postier", self.measure_postier,
                   "postier serve --smtp, trusted network, delivery to the sink (defaults: "
                   "on two cores or more, delivery in one child process)"),
            System("postier-inproc", "postier",
                   lambda r: self.measure_postier(r, delivery_processes=0),
                   "the same with --delivery-processes 0: acceptance and delivery in one "
                   "process (the default on one core)"),
            System("postfix", "baseline", self.measure_postfix,
                   "Postfix 3 (Debian) as a relay to the same sink, defaults"),
        ]

    def ratios(self) -> list[Ratio]:
        return [Ratio("Postier / Postfix, end to end", "postier", "postfix", target=2.0),
                Ratio("Postier, one process / Postfix, end to end", "postier-inproc",
                      "postfix")]


SCENARIO = SmtpRelay
