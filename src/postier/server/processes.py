"""The server's processes: ``postier serve`` (the HTTP API, SMTP submission and delivery;
with two cores or more, delivery in child processes and the HTTP API in several processes
sharing its port, :mod:`postier.server.child_processes`), ``postier worker`` (delivery
only) and ``postier http-process`` (one of those HTTP processes)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import uvicorn

from postier.core import first_run
from postier.core.crypto import key_file_problem
from postier.core.service import Postier
from postier.delivery.limits import SharedLimits
from postier.delivery.pool import RelayPool
from postier.delivery.worker import DeliveryWorker
from postier.errors import PostierError
from postier.i18n import N_
from postier.ops import metrics
from postier.ops.alerts import AlertTask, attach
from postier.ops.bounces import BounceMailboxTask
from postier.ops.retention import RetentionTask
from postier.server import smtp as smtp_server
from postier.server.api import create_app
from postier.server.bounce_smtp import start_bounce_door
from postier.server.child_processes import (
    DeliveryProcesses,
    HttpProcesses,
    bind_http,
    receive,
)
from postier.server.config import ServerConfig, split_host_port
from postier.store.postgres import PostgresStore

log = logging.getLogger("postier")


class AlreadyRunning(PostierError):
    code = "already_running"
    default_template = N_(
        "Another Postier server is already delivering from {path} (process {pid}); stop it "
        "first, or give this one another --data-dir."
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


def _on(value: str | None) -> bool:
    return bool(value) and str(value).lower() != "off"


async def start_smtp(core: Postier, config: ServerConfig) -> list[asyncio.Server]:
    """SMTP submission doors (STARTTLS and implicit TLS) and the bounce door, as
    configured."""
    doors = [(v, implicit) for v, implicit in ((config.smtp, False), (config.smtps, True))
             if _on(v)]
    if not doors and not _on(config.bounce_smtp):
        return []
    if config.tls_cert and config.tls_key:
        cert, key = config.tls_cert, config.tls_key
    else:
        cert, key = smtp_server.self_signed(config.data_dir, config.hostname)
    tls = smtp_server.server_tls_context(cert, key)
    servers = []
    if _on(config.bounce_smtp):
        host, port = split_host_port(config.bounce_smtp, 25)
        servers.append(await start_bounce_door(core, host=host, port=port, tls=tls))
        log.info("bounce SMTP door on %s:%d", host, port)
    sub = smtp_server.SubmissionConfig(
        max_recipients=config.smtp_max_recipients,
        max_connections=config.smtp_max_connections,
        rate_per_minute=config.smtp_rate_per_minute,
        trusted_networks=smtp_server.parse_networks([config.smtp_trusted_networks]),
        trusted_account=config.smtp_trusted_account,
    )
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
        data = receive(control, 64)
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


@dataclass
class _ServerParts:
    """What a ``postier serve`` process runs beside its HTTP API: started once the web
    server is up (:meth:`start`), stopped in order when it stops (:meth:`stop`)."""

    config: ServerConfig
    core: Postier
    host: str
    port: int
    lock: IO[str] | None  # the data-dir lock of a delivering embedded store
    worker: DeliveryWorker | None  # delivery on this process's event loop
    children: DeliveryProcesses | None  # or delivery in child processes
    listening: list[socket.socket] | None  # the HTTP port's sockets, with HTTP processes
    http_children: HttpProcesses | None
    retention: RetentionTask
    alerts: AlertTask | None
    mailboxes: BounceMailboxTask
    smtp_servers: list[asyncio.Server] = field(default_factory=list)

    async def start(self) -> None:
        core = self.core
        if self.lock is not None:
            # This process, or its delivery children, is the store's only deliverer: what
            # is still "sending" was interrupted by a previous stop.
            back = await core.store.release_expired_leases(time.time(), everything=True)
            if back:
                log.info("%d e-mails interrupted by a previous stop go out again", back)
        if self.worker is not None:
            core.on_accept(self.worker.notify)
            await self.worker.start()
            await listen(core, self.worker)
        if self.children is not None:
            core.on_accept(self.children.notify)
            await self.children.start()
        if self.alerts is not None:
            self.alerts.start()
        self.smtp_servers.extend(await start_smtp(core, self.config))
        self.retention.start()
        self.mailboxes.start()
        if self.http_children is not None:
            await self.http_children.start()
        tune_gc()
        log.info("Postier listening on http://%s:%d (API description: /docs); data in %s",
                 self.host, self.port, self.config.data_dir)
        await first_run.announce(core.store, self.host, self.port, self.config.data_dir)

    async def stop(self) -> None:
        t0 = time.monotonic()
        for s in self.smtp_servers:
            s.close()
        if self.http_children is not None:
            await self.http_children.stop()
        await self.retention.stop()
        await self.mailboxes.stop()
        if self.alerts is not None:
            await self.alerts.stop()
        if self.worker is not None:
            await self.worker.stop()
        if self.children is not None:
            await self.children.stop()
        await self.core.close()
        log.info("Postier stopped cleanly in %.1f s", time.monotonic() - t0)


def _server_parts(config: ServerConfig, log_level: str) -> _ServerParts:
    """The parts of a ``postier serve`` process, made in this order: the data-dir lock and
    the HTTP port are taken at once, so that another server already there is said first."""
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
    return _ServerParts(
        config, core, host, port, lock, worker, children, listening, http_children,
        retention=RetentionTask(core, config.retention_interval),
        mailboxes=BounceMailboxTask(core),
        alerts=attach(core, worker) if worker is not None else None,
    )


async def serve(config: ServerConfig, log_level: str = "INFO") -> None:
    """``postier serve`` until it is stopped (SIGINT or SIGTERM: status 0)."""
    parts = _server_parts(config, log_level)
    # Opened before the HTTP server starts, so that a wrong key or an unusable store is
    # reported as a clear error rather than from inside the web server's start-up.
    await parts.core.open()
    problem = key_file_problem(config.data_dir)
    if problem:
        log.warning("secret key file: %s", problem)
    app = create_app(parts.core, on_startup=parts.start, on_shutdown=parts.stop)
    app.state.worker = parts.worker or parts.children  # for GET /api/v1/ready and /metrics
    server = _Server(
        uvicorn.Config(
            app,
            host=parts.host,
            port=parts.port,
            log_level="warning",
            lifespan="on",
            access_log=False,
            timeout_graceful_shutdown=15,
        )
    )
    listening = parts.listening
    try:
        await server.serve(sockets=listening[:1] if listening is not None else None)
    finally:
        for sock in listening or ():
            sock.close()
        if parts.lock is not None:
            parts.lock.close()


def run(config: ServerConfig, log_level: str = "INFO") -> None:
    config.data_dir = config.data_dir.resolve()
    use_fast_loop()
    asyncio.run(serve(config, log_level))


def tune_gc() -> None:
    """Once started: what was allocated so far (modules, the app, caches) leaves the
    cyclic collector's view, and it runs every 20,000 allocations instead of 700. Under
    load the collector would scan that start-up heap again and again, a large share of
    the HTTP acceptance's time and of its slowest answers (docs/performance.md).
    Reference cycles are still collected, only less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def use_fast_loop() -> None:
    """uvloop when it is installed (uvicorn[standard] brings it): the same asyncio, faster
    on acceptance (docs/performance.md)."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
