"""``postier serve``: the HTTP API, SMTP submission and delivery; with two cores or more,
delivery in child processes (``--delivery-processes``) and the HTTP API in several
processes sharing its port (``--http-processes``)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import uvicorn

from postier.core import first_run
from postier.core.aio import cancel_and_wait
from postier.core.crypto import key_file_problem
from postier.core.service import Postier
from postier.delivery.limits import SharedLimits
from postier.delivery.relay import RelayPool
from postier.delivery.worker import DeliveryWorker
from postier.errors import PostierError
from postier.i18n import N_
from postier.ops import metrics
from postier.server.api import create_app
from postier.server.config import ServerConfig, split_host_port

log = logging.getLogger("postier")


class AlreadyRunning(PostierError):
    code = "already_running"
    default_template = N_(
        "Another Postier server is already delivering from {path} (process {pid}); stop it "
        "first, or give this one another --data-dir."
    )


class CannotListen(PostierError):
    code = "cannot_listen"
    default_template = N_(
        "Cannot listen on {address}: {reason}. Stop the program that uses it, or give "
        "another HOST:PORT (--http or POSTIER_HTTP)."
    )


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Only one delivering process per embedded store: it then knows that any message
    left "sending" belongs to a crashed predecessor and can go out again at once."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "serve.lock"
    fh = path.open("a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        pid = fh.read().strip() or "?"
        fh.close()
        raise AlreadyRunning(path=str(data_dir), pid=pid) from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


class _Server(uvicorn.Server):
    """uvicorn, but a SIGTERM or SIGINT ends the process with status 0 after the graceful
    shutdown, as a service manager expects of a clean stop."""

    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in self.signals:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in self.signals:
                loop.remove_signal_handler(sig)


class _ChildServer(_Server):
    """An HTTP process's uvicorn: stopped by its parent (SIGTERM), never by SIGINT (a
    Ctrl-C is the server's to answer, by stopping its children in order)."""

    signals = (signal.SIGTERM,)


async def start_smtp(core: Postier, config: ServerConfig) -> list[asyncio.Server]:
    """SMTP submission doors (STARTTLS and implicit TLS), as configured."""
    from postier.server import smtp as smtp_server

    doors = [(v, implicit) for v, implicit in ((config.smtp, False), (config.smtps, True))
             if v and v.lower() != "off"]
    if not doors:
        return []
    if config.tls_cert and config.tls_key:
        cert, key = config.tls_cert, config.tls_key
    else:
        cert, key = smtp_server.self_signed(config.data_dir, config.hostname)
    tls = smtp_server.server_tls_context(cert, key)
    sub = smtp_server.SubmissionConfig(
        max_recipients=config.smtp_max_recipients,
        max_connections=config.smtp_max_connections,
        rate_per_minute=config.smtp_rate_per_minute,
        trusted_networks=smtp_server.parse_networks([config.smtp_trusted_networks]),
        trusted_account=config.smtp_trusted_account,
    )
    servers = []
    for value, implicit in doors:
        host, port = split_host_port(value, 465 if implicit else 2587)
        servers.append(await smtp_server.start_submission(
            core, host=host, port=port, implicit_tls=implicit, tls=tls, config=sub))
        log.info("SMTP submission (%s) on %s:%d", "implicit TLS" if implicit else "STARTTLS",
                 host, port)
    log.info("SMTP certificate %s, SHA-256 fingerprint %s", cert, smtp_server.fingerprint(cert))
    return servers


async def listen(core: Postier, worker: DeliveryWorker) -> None:
    """Wake the worker when another process queues e-mails (PostgreSQL's NOTIFY)."""
    from postier.store.postgres import PostgresStore

    if isinstance(core.store, PostgresStore):
        await core.store.listen(worker.notify)


def make_worker(
    core: Postier, config: ServerConfig, worker_id: str | None = None
) -> DeliveryWorker:
    return DeliveryWorker(
        core.store,
        core.delivery_settings,
        pool=RelayPool(
            concurrency=config.relay_concurrency,
            idle_timeout=config.idle_timeout,
            local_hostname=config.hostname,
            # A killed worker's connection slots come back when its messages do.
            limits=SharedLimits(core.store, lease_seconds=config.lease_seconds,
                                mac=core.secrets.mac),
        ),
        worker_id=worker_id,
        claim_batch=config.claim_batch,
        lease_seconds=config.lease_seconds,
        poll_interval=config.poll_interval,
        sign=core.dkim_sign,
        on_failure=core.failure_notice,
        on_delay=core.delay_notice,
    )


async def run_worker(
    config: ServerConfig, *, wake_fd: int | None = None, worker_id: str | None = None
) -> None:
    """``postier worker``: delivery only, on any machine that reaches the database — or a
    child of ``postier serve --delivery-processes``, woken through ``wake_fd``."""
    core = Postier(config, store_role="deliver")
    await core.open()
    worker = make_worker(core, config, worker_id)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if wake_fd is None:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    else:
        # A child of postier serve: SIGINT (a Ctrl-C) is the server's to answer; it stops
        # its children with SIGTERM, so none is started again meanwhile.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.set_blocking(wake_fd, False)

        def woken() -> None:
            try:
                data = os.read(wake_fd, 65536)
            except BlockingIOError:
                return
            if data:
                worker.notify()
                return
            # The server is gone (killed: a stopping server stops its children first). Go
            # at once, as this process would have gone with it had it delivered itself: the
            # next server to start gives back every e-mail still "sending", and one this
            # process went on sending meanwhile would go out twice.
            log.warning("the server is gone: delivery process %s stops now; the e-mails it "
                        "was sending go out again when the server starts",
                        worker.worker_id)
            logging.shutdown()
            os._exit(1)

        loop.add_reader(wake_fd, woken)
    from postier.ops.alerts import attach  # issue 11: alerts and webhook

    alerts = attach(core, worker)
    await worker.start()
    await listen(core, worker)
    alerts.start()
    tune_gc()
    log.info("delivery worker %s running on %s", worker.worker_id, core.store.backend)
    await stop.wait()
    await alerts.stop()
    await worker.stop()
    await core.close()
    log.info("worker stopped cleanly")


async def terminate(procs: list[asyncio.subprocess.Process], grace: float) -> None:
    """SIGTERM to each child, then SIGKILL to those still running after ``grace`` s."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


class DeliveryProcesses:
    """Delivery in child processes (``postier serve --delivery-processes N``).

    One process runs acceptance and delivery on one event loop and one core; with two
    cores or more, acceptance stays here and delivery goes to ``postier worker`` children
    sharing the store. This process keeps the data-dir lock, so the children are the
    store's only deliverers; it wakes them through a pipe at every acceptance (PostgreSQL
    adds its NOTIFY), gives back a dead child's e-mails at once and starts it again.
    Shaped like a :class:`DeliveryWorker` for ``/api/v1/ready`` and ``/metrics``.
    """

    def __init__(self, config: ServerConfig, core: Postier, log_level: str,
                 count: int) -> None:
        self.config = config
        self.core = core
        self.count = count
        self.log_level = log_level
        self.running = False
        self._tasks: list[asyncio.Task[None]] = []
        self._children: list[tuple[str, asyncio.subprocess.Process | None, int]] = []
        self._stopping = False

    def notify(self) -> None:
        # Called after an acceptance is stored: never let a wake-up fail it. A full pipe
        # already holds a wake-up; a child being restarted polls at its start.
        for _, _, fd in self._children:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.write(fd, b".")

    async def _spawn(self, worker_id: str) -> tuple[asyncio.subprocess.Process, int]:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        argv = [sys.executable, "-m", "postier", "worker", "--data-dir",
                str(self.config.data_dir), "--log-level", self.log_level,
                "--wake-fd", str(read_fd), "--worker-id", worker_id]
        # The database URL in the environment, not on the command line, which any user
        # of the machine can read (ps) and which may hold a password.
        env = dict(os.environ)
        if self.config.database_url:
            env["POSTIER_DATABASE_URL"] = self.config.database_url
        try:
            # A session of its own: a terminal's Ctrl-C reaches the server only.
            proc = await asyncio.create_subprocess_exec(*argv, pass_fds=(read_fd,), env=env,
                                                        start_new_session=True)
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        log.info("delivery process %s started (pid %d)", worker_id, proc.pid)
        return proc, write_fd

    async def start(self) -> None:
        base = f"{self.config.hostname.split('.')[0]}-{os.getpid()}"
        for i in range(self.count):
            worker_id = f"{base}-d{i + 1}"
            proc, fd = await self._spawn(worker_id)
            self._children.append((worker_id, proc, fd))
        self._tasks = [asyncio.create_task(self._supervise(), name="postier-delivery-procs")]
        self.running = True

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            for i, (worker_id, proc, fd) in enumerate(self._children):
                if self._stopping:
                    break
                if proc is not None and proc.returncode is None:
                    continue
                if proc is not None:
                    log.error("delivery process %s (pid %d) ended with status %s; starting "
                              "it again", worker_id, proc.pid, proc.returncode)
                    os.close(fd)
                    self._children[i] = (worker_id, None, -1)
                    try:
                        back = await self.core.store.release_worker(worker_id)
                        if back:
                            log.info("%d e-mails it was sending go out again", back)
                    except Exception:
                        log.exception("could not give back the e-mails of %s; they come "
                                      "back when their lease expires", worker_id)
                try:
                    new_proc, new_fd = await self._spawn(worker_id)
                except Exception:
                    log.exception("could not start delivery process %s; trying again",
                                  worker_id)
                    continue
                self._children[i] = (worker_id, new_proc, new_fd)

    async def stop(self, grace: float = 15.0) -> None:
        self._stopping = True
        await cancel_and_wait(*self._tasks)
        procs = [p for _, p, _ in self._children if p is not None and p.returncode is None]
        await terminate(procs, grace)
        for _, _, fd in self._children:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._children = []
        self.running = False


def bind_http(host: str, port: int, count: int) -> list[socket.socket]:
    """The HTTP port, bound here ``count`` times with ``SO_REUSEPORT``: one listening
    socket for each HTTP process, among which the kernel spreads new connections evenly
    (one shared socket would let whichever process wakes first take a whole burst of
    them). This process keeps them all, so a child that is restarted finds the
    connections that arrived for it meanwhile waiting, not refused."""
    address = f"{host}:{port}"
    sockets: list[socket.socket] = []
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        # First an ordinary bind: SO_REUSEPORT would let this server share the port with
        # another one (of the same user) already there, instead of saying it is taken.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
            sockaddr = probe.getsockname()  # port 0: every socket takes the same port
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
            sock.listen(2048)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise CannotListen(address=address, reason=exc.strerror or str(exc)) from exc
    return sockets


def _receive(control: socket.socket, size: int) -> bytes | None:
    """What the other end of a control socket pair sent: None when nothing is waiting,
    ``b""`` when that end is gone."""
    try:
        return control.recv(size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


class HttpProcesses:
    """The HTTP API and web pages in several processes (``postier serve --http-processes
    N``): this one and N - 1 children accept connections on the same port (each from its
    own socket, :func:`bind_http`), so that reading, checking and rendering e-mails uses
    every core.

    The children only answer HTTP (store role "accept"); SMTP submission, delivery (or its
    processes), alerts and retention stay in this process, and whatever must hold across
    processes is in the store (sign-in throttling) or read again within seconds (settings,
    tokens). Each child is tied to this process by a socket pair: it tells of each
    acceptance, so that this process wakes delivery as for its own; this process tells it
    whether delivery runs (for ``/api/v1/ready`` and ``/metrics``); the child stops when
    the pair closes, this process being gone. A child that ends is started again.
    """

    def __init__(self, config: ServerConfig, core: Postier, log_level: str,
                 listening: list[socket.socket],
                 delivery_running: Callable[[], bool]) -> None:
        self.config = config
        self.core = core
        self.log_level = log_level
        self.listening = listening
        self.delivery_running = delivery_running
        self._children: list[tuple[asyncio.subprocess.Process | None, socket.socket | None]] = []
        self._state = b""
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def _spawn(self, index: int) -> tuple[asyncio.subprocess.Process, socket.socket]:
        listening = self.listening[index]
        mine, theirs = socket.socketpair()
        mine.setblocking(False)
        argv = [sys.executable, "-m", "postier", "http-process",
                "--listen-fd", str(listening.fileno()),
                "--control-fd", str(theirs.fileno()), "--index", str(index),
                "--log-level", self.log_level]
        try:
            # In a session of its own: a Ctrl-C in the terminal reaches the server
            # only, which stops its children after the requests they have begun.
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, start_new_session=True,
                pass_fds=(listening.fileno(), theirs.fileno()))
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        # The whole configuration, as this process resolved it (environment and command
        # line), through a pipe: a database password stays out of the process list.
        assert proc.stdin is not None
        proc.stdin.write(self.config.model_dump_json().encode())
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        proc.stdin.close()
        asyncio.get_running_loop().add_reader(mine.fileno(), self._from_child, mine)
        with contextlib.suppress(OSError):
            mine.send(self._state)
        log.info("HTTP process %d started (pid %d)", index, proc.pid)
        return proc, mine

    def _from_child(self, control: socket.socket) -> None:
        data = _receive(control, 4096)
        if data is None:
            return
        if data:
            self.core.accepted_elsewhere()
        else:  # the child is gone; _supervise starts it again
            asyncio.get_running_loop().remove_reader(control.fileno())

    def _tell_state(self) -> None:
        state = b"1" if self.delivery_running() else b"0"
        if state == self._state:
            return
        self._state = state
        for _, control in self._children:
            if control is not None:
                with contextlib.suppress(OSError):
                    control.send(state)

    async def start(self) -> None:
        self._tell_state()  # no child yet: sets the state the children start with
        for index in range(1, self.config.http_processes):
            self._children.append(await self._spawn(index))
        self._task = asyncio.create_task(self._supervise(), name="postier-http-procs")

    def _close(self, control: socket.socket | None) -> None:
        if control is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(control.fileno())
            control.close()

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            self._tell_state()
            for i, (proc, control) in enumerate(self._children):
                if self._stopping:
                    break
                if proc is not None and proc.returncode is None:
                    continue
                if proc is not None:
                    log.error("HTTP process %d (pid %d) ended with status %s; starting it "
                              "again", i + 1, proc.pid, proc.returncode)
                    self._close(control)
                    self._children[i] = (None, None)
                try:
                    self._children[i] = await self._spawn(i + 1)
                except Exception:
                    log.exception("could not start HTTP process %d; trying again", i + 1)

    async def stop(self, grace: float = 20.0) -> None:
        """Each child finishes the requests it has begun (uvicorn's graceful shutdown)."""
        self._stopping = True
        await cancel_and_wait(self._task)
        procs = [p for p, _ in self._children if p is not None and p.returncode is None]
        await terminate(procs, grace)
        for _, control in self._children:
            self._close(control)
        self._children = []


class _ParentDelivery:
    """An HTTP process's view of its parent's delivery, for ``/api/v1/ready`` and
    ``/metrics`` (shaped like a worker for :func:`postier.ops.metrics.delivery_state`)."""

    running = False


async def run_http_process(config: ServerConfig, *, listen_fd: int, control_fd: int,
                           index: int) -> None:
    """One of the HTTP processes of ``postier serve --http-processes`` (see
    :class:`HttpProcesses`)."""
    core = Postier(config, store_role="accept")
    await core.open()
    loop = asyncio.get_running_loop()
    control = socket.socket(fileno=control_fd)
    control.setblocking(False)
    delivery = _ParentDelivery()
    pending = False

    def tell() -> None:
        nonlocal pending
        pending = False
        # A full socket already holds a wake-up for the parent.
        with contextlib.suppress(OSError):
            control.send(b".")

    def accepted() -> None:
        nonlocal pending
        if not pending:  # one wake-up for all the acceptances of a turn of the loop
            pending = True
            loop.call_soon(tell)

    def from_parent() -> None:
        data = _receive(control, 64)
        if data is None:
            return
        if data:
            delivery.running = data[-1:] == b"1"
            return
        loop.remove_reader(control.fileno())
        log.warning("HTTP process %d: the server is gone; stopping", index)
        server.should_exit = True

    core.on_accept(accepted)
    loop.add_reader(control.fileno(), from_parent)

    async def startup() -> None:
        tune_gc()
        log.info("HTTP process %d answering (pid %d)", index, os.getpid())

    async def shutdown() -> None:
        await core.close()

    app = create_app(core, on_startup=startup, on_shutdown=shutdown)
    app.state.worker = delivery
    server = _ChildServer(uvicorn.Config(app, log_level="warning", lifespan="on",
                                         access_log=False, timeout_graceful_shutdown=15))
    await server.serve(sockets=[socket.socket(fileno=listen_fd)])


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The format names no source line, thread or process: don't collect them for every
    # record (the logging HOWTO's "Optimization"; a line per e-mail accepted and sent).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # aiosmtpd logs every SMTP command at INFO: addresses of every e-mail, too much.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


async def serve(config: ServerConfig, log_level: str = "INFO") -> None:
    processes = config.delivery_process_count() if config.delivery else 0
    # This process's event loop delivers too only when there is no delivery process.
    core = Postier(config, store_role="all" if config.delivery and not processes else "accept")
    embedded = core.store.embedded
    lock = lock_data_dir(Path(config.data_dir)) if (embedded and config.delivery) else None
    children = DeliveryProcesses(config, core, log_level, processes) if processes else None
    worker = make_worker(core, config) if config.delivery and children is None else None
    host, port = config.http_host_port()
    listening = bind_http(host, port, config.http_processes) if config.http_processes > 1 \
        else None
    http_children = HttpProcesses(
        config, core, log_level, listening,
        lambda: metrics.delivery_state(worker or children, config.delivery) == "running",
    ) if listening is not None else None
    smtp_servers: list[asyncio.Server] = []
    data_dir = config.data_dir
    from postier.ops.retention import RetentionTask  # issue 11: purge of old e-mails (RGPD)

    retention = RetentionTask(core, config.retention_interval)
    from postier.ops.alerts import attach  # issue 11: alerts and webhook, beside delivery

    alerts = attach(core, worker) if worker is not None else None

    # Opened before the HTTP server starts, so that a wrong key or an unusable store is
    # reported as a clear error rather than from inside the web server's start-up.
    await core.open()
    problem = key_file_problem(config.data_dir)
    if problem:
        log.warning("secret key file: %s", problem)

    async def startup() -> None:
        if lock is not None:
            # This process, or its delivery children, is the store's only deliverer: what
            # is still "sending" was interrupted by a previous stop.
            back = await core.store.release_expired_leases(time.time(), everything=True)
            if back:
                log.info("%d e-mails interrupted by a previous stop go out again", back)
        if worker is not None:
            core.on_accept(worker.notify)
            await worker.start()
            await listen(core, worker)
        if children is not None:
            core.on_accept(children.notify)
            await children.start()
        if alerts is not None:
            alerts.start()
        smtp_servers.extend(await start_smtp(core, config))
        retention.start()
        if http_children is not None:
            await http_children.start()
        tune_gc()
        log.info("Postier listening on http://%s:%d (API description: /docs); data in %s",
                 host, port, data_dir)
        await first_run.announce(core.store, host, port, data_dir)

    async def shutdown() -> None:
        t0 = time.monotonic()
        for s in smtp_servers:
            s.close()
        if http_children is not None:
            await http_children.stop()
        await retention.stop()
        if alerts is not None:
            await alerts.stop()
        if worker is not None:
            await worker.stop()
        if children is not None:
            await children.stop()
        await core.close()
        log.info("Postier stopped cleanly in %.1f s", time.monotonic() - t0)

    app = create_app(core, on_startup=startup, on_shutdown=shutdown)
    app.state.worker = worker or children  # for GET /api/v1/ready and /metrics
    server = _Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="on",
            access_log=False,
            timeout_graceful_shutdown=15,
        )
    )
    try:
        await server.serve(sockets=listening[:1] if listening is not None else None)
    finally:
        for sock in listening or ():
            sock.close()
        if lock is not None:
            lock.close()


def run(config: ServerConfig, log_level: str = "INFO") -> None:
    config.data_dir = config.data_dir.resolve()
    use_fast_loop()
    asyncio.run(serve(config, log_level))


def tune_gc() -> None:
    """Once started: what was allocated so far (modules, the app, caches) leaves the
    cyclic collector's view, and it runs every 20,000 allocations instead of 700. Under
    load the collector was scanning that start-up heap again and again: the HTTP
    acceptance went from 2,223 to 3,247 e-mails/s and its p99 from 107 to 20 ms
    (docs/performance.md). Reference cycles are still collected, only less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def use_fast_loop() -> None:
    """uvloop when it is installed (uvicorn[standard] brings it): the same asyncio, a
    fifth faster on acceptance (docs/performance.md)."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
