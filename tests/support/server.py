"""A real ``postier serve`` process for end-to-end tests, and the fixtures that give a test
its server: that process, or the same server in the test process for a module marked
``in_process`` (:mod:`support.inprocess`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .inprocess import InProcessServer
from .running import PostierServer, free_port

__all__ = ["InProcessServer", "PostierServer", "ServerProcess", "alive", "child_processes",
           "free_port"]


def child_processes(pid: int, kind: bytes) -> list[int]:
    """The processes whose parent is ``pid`` and whose command line holds ``kind``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
        if int(stat.rpartition(")")[2].split()[1]) == pid and kind in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting for its parent does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


class ServerProcess(PostierServer):
    """``postier serve`` in its own process, as an operator runs it."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(data_dir)
        self.args: list[str] = []
        self.env = {**os.environ, "POSTIER_POLL_INTERVAL": "0.2", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.new_session = False  # True: a process group of its own, as a shell starts it
        self.cpus: set[int] | None = None  # run on these cores only (CPU affinity)
        self.log_path = data_dir / "server.log"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postier", "serve", "--data-dir", str(self.data_dir),
             "--http", f"127.0.0.1:{self.port}", "--smtp", f"127.0.0.1:{self.smtp_port}",
             *self.args],
            env=self.env,
            start_new_session=self.new_session,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda cpus=self.cpus: os.sched_setaffinity(0, cpus))
            if self.cpus else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"postier serve exited at start-up:\n{self.log()}")
            try:
                if httpx.get(self.url + "/api/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"postier serve did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            raise AssertionError(f"postier serve ignored {sig} for {timeout} s") from None
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def in_process(request: pytest.FixtureRequest) -> bool:
    """Whether the test's module (or class, or the test) is marked ``in_process``: its
    servers then run in the test process (:class:`InProcessServer`), their subject being
    what the server answers, not the process."""
    return request.node.get_closest_marker("in_process") is not None


@pytest.fixture
def server_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """``make(data_dir=None, provision=True, **env)``: a server not started yet, stopped at
    the end of the test."""
    kind = InProcessServer if in_process(request) else ServerProcess
    made: list[ServerProcess | InProcessServer] = []

    def make(data_dir: Path | None = None, provision: bool = True,
             **env: str) -> ServerProcess | InProcessServer:
        s = kind(data_dir or tmp_path / f"data{len(made)}", env)
        if provision:
            s.provision()
        made.append(s)
        return s

    yield make
    for s in made:
        s.kill()


@pytest.fixture
def server(server_factory: Any) -> PostierServer:
    """A running server with an admin, alice (inside ac-lyon.fr) and bob (gmail.com)."""
    s: PostierServer = server_factory().start()
    return s


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """Like ``server``, but always ``postier serve`` in its own process, also in a module
    marked ``in_process``: for the tests whose subject is the process (signals, a kill, a
    start-up failure, its log)."""
    s = ServerProcess(tmp_path / "process-data")
    s.provision()
    yield s.start()
    s.kill()
