"""``postier serve`` inside the test process, for tests whose subject is not the process.

:class:`InProcessServer` runs the very coroutine ``postier serve`` runs
(:func:`postier.server.processes.serve`): the same application, store, delivery, SMTP
submission, alerts and retention, answering HTTP on a real port of 127.0.0.1, so that an
``httpx`` client, a browser or the ``postier`` command meet it as they meet the real
process. It runs on an event loop in a thread of its own and costs a fraction of a second
to start, where a process costs seconds (a Python interpreter, its imports, and a
delivery process beside it).

It differs from the process in what a process is, so tests of signals, crashes, restarts,
child processes, start-up failures and the like keep :class:`~support.server.ServerProcess`
(a module marked ``in_process`` gets this server from the ``server`` fixtures):

- Delivery runs on the server's own event loop (``delivery_processes`` 0), as
  ``postier serve`` does on a machine with one core; the delivery processes have their own
  tests.
- Only the main thread may receive signals, and they belong to pytest: the server's loop
  keeps the handlers ``postier serve`` installs, and :meth:`InProcessServer.stop` calls the
  SIGTERM handler, as the signal would.
- The environment is the test's: settings of the server (``POSTIER_<NAME>`` naming a
  field of :class:`~postier.server.config.ServerConfig`) are given to its configuration;
  any other variable would reach the whole test process, so it is refused.
- The loop is asyncio's own (``postier serve`` takes uvloop when installed), and the
  garbage collector is left as the test process has it (``postier serve`` tunes it once
  started).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

from postier.server import processes
from postier.server.config import ServerConfig

from .running import PostierServer

START_TIMEOUT = 20.0


class ServingLoop(asyncio.SelectorEventLoop):
    """The event loop of a server in a thread. It keeps the signal handlers the server
    installs (only the main thread may handle signals), and tells when the HTTP port
    listens."""

    def __init__(self, http_port: int) -> None:
        super().__init__()
        self.http_port = http_port
        self.listening = threading.Event()
        self.signal_handlers: dict[int, tuple[Callable[..., Any], tuple[Any, ...]]] = {}

    def add_signal_handler(self, sig: int, callback: Callable[..., Any], *args: Any) -> None:
        self.signal_handlers[sig] = (callback, args)

    def remove_signal_handler(self, sig: int) -> bool:
        return self.signal_handlers.pop(sig, None) is not None

    def deliver(self, sig: int) -> bool:
        """Run the handler of ``sig`` on this loop, as the signal would; False when the
        server has none (not started yet, or stopped)."""
        handler = self.signal_handlers.get(sig)
        if handler is None or self.is_closed():
            return False
        callback, args = handler
        self.call_soon_threadsafe(callback, *args)
        return True

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:  # type: ignore[override]
        server = await super().create_server(*args, **kwargs)
        if any(sock.getsockname()[1] == self.http_port for sock in server.sockets):
            self.listening.set()
        return server


class ThreadLog(logging.Handler):
    """The log records of one thread (the server's), for failure messages."""

    def __init__(self) -> None:
        super().__init__()
        self.thread: int | None = None
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.lines.append(self.format(record))


def server_config(data_dir: Path, http_port: int, smtp_port: int,
                  env: dict[str, str]) -> ServerConfig:
    """The configuration ``postier serve --data-dir --http --smtp`` would take from the
    command line and ``env``."""
    fields = {f"POSTIER_{name.upper()}" for name in ServerConfig.model_fields}
    others = sorted(set(env) - fields)
    if others:
        raise ValueError(
            f"{', '.join(others)}: not a setting of the server; an in-process server shares "
            "the test's environment (use monkeypatch.setenv, or a ServerProcess)")
    settings = {"POSTIER_POLL_INTERVAL": "0.2", "POSTIER_DELIVERY_PROCESSES": "0", **env}
    with mock.patch.dict(os.environ, settings):
        return ServerConfig(data_dir=data_dir.resolve(), http=f"127.0.0.1:{http_port}",
                            smtp=f"127.0.0.1:{smtp_port}")


class InProcessServer(PostierServer):
    """``postier serve`` on an event loop in a thread of the test process."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(data_dir)
        self.settings = dict(env or {})
        # The environment of a command run beside this server (``postier`` at the console),
        # as ServerProcess.env is its process's.
        self.env = {**os.environ, **self.settings}
        self.config: ServerConfig | None = None
        self.loop: ServingLoop | None = None
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.log_handler = ThreadLog()

    def start(self, timeout: float = START_TIMEOUT) -> InProcessServer:
        assert self.thread is None, "this server is already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = server_config(self.data_dir, self.port, self.smtp_port, self.settings)
        self.failure = None
        self.loop = ServingLoop(self.port)
        self.thread = threading.Thread(target=self._serve, args=(self.loop, self.config),
                                       name=f"postier-serve-{self.port}", daemon=True)
        logging.getLogger().addHandler(self.log_handler)
        self.thread.start()
        self.log_handler.thread = self.thread.ident
        # Waits for whichever comes first: the HTTP port listening, or the server's end.
        while not self.loop.listening.wait(0.05):
            if not self.thread.is_alive():
                thread, self.thread = self.thread, None
                thread.join()
                raise AssertionError(f"postier serve stopped at start-up: {self.failure!r}"
                                     f"\n{self.log()}")
            timeout -= 0.05
            if timeout <= 0:
                raise AssertionError(f"postier serve did not listen in time:\n{self.log()}")
        return self

    def _serve(self, loop: ServingLoop, config: ServerConfig) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(processes.serve(config))
        except BaseException as exc:  # uvicorn ends a failed start-up with SystemExit
            self.failure = exc
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def log(self) -> str:
        return "\n".join(self.log_handler.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Stop the server as ``sig`` stops ``postier serve`` (its graceful shutdown);
        0 when it ended cleanly, as the process's exit status would say."""
        if self.thread is None or self.loop is None:
            return 0
        self.loop.deliver(sig)
        self.thread.join(timeout)
        logging.getLogger().removeHandler(self.log_handler)
        if self.thread.is_alive():
            raise AssertionError(f"postier serve ignored {sig} for {timeout} s")
        self.thread = None
        if self.failure is not None:
            raise AssertionError(f"postier serve failed: {self.failure!r}\n{self.log()}")
        return 0

    def kill(self) -> None:
        """A thread cannot be killed: the server stops as it does at a SIGTERM."""
        self.stop()
