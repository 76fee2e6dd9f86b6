"""The child processes ``postier serve`` starts and watches over: delivery in ``postier
worker`` children (``--delivery-processes``), and the HTTP API in ``postier http-process``
children sharing its port (``--http-processes``). Each child that ends is started again;
stopping the server stops them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from postier.core.aio import cancel_and_wait
from postier.core.service import Postier
from postier.errors import PostierError
from postier.i18n import N_
from postier.server.config import ServerConfig

log = logging.getLogger("postier")


class CannotListen(PostierError):
    code = "cannot_listen"
    default_template = N_(
        "Cannot listen on {address}: {reason}. Stop the program that uses it, or give "
        "another HOST:PORT (--http or POSTIER_HTTP)."
    )


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


def receive(control: socket.socket, size: int) -> bytes | None:
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
        data = receive(control, 4096)
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
