"""A real ``postier serve`` process for end-to-end tests, and accounts provisioned in it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from postier.core.service import Postier
from postier.server.config import ServerConfig


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Accounts:
    tokens: dict[str, str] = field(default_factory=dict)


async def _provision(data_dir: Path) -> dict[str, str]:
    core = Postier(ServerConfig(data_dir=data_dir))
    await core.open()
    try:
        people = [
            ("admin", "direction@ac-lyon.fr", "Direction", "admin"),
            ("alice", "alice.martin@ac-lyon.fr", "Alice Martin", "user"),
            ("bob", "bob.durand@gmail.com", "Bob Durand", "user"),
        ]
        tokens = {}
        for username, email, name, role in people:
            user = await core.add_user(
                username, email, display_name=name, role=role, password="motdepasse-" + username
            )
            tokens[username], _ = await core.create_token(user, "tests")
        return tokens
    finally:
        await core.close()


class ServerProcess:
    """``postier serve`` in its own process, as an operator runs it."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.smtp_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args: list[str] = []
        self.env = {**os.environ, "POSTIER_POLL_INTERVAL": "0.2", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.new_session = False  # True: a process group of its own, as a shell starts it
        self.cpus: set[int] | None = None  # run on these cores only (CPU affinity)
        self.log_path = data_dir / "server.log"
        self.tokens: dict[str, str] = {}

    def provision(self) -> dict[str, str]:
        self.tokens = asyncio.run(_provision(self.data_dir))
        return self.tokens

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

    def client(self, user: str = "admin", **headers: str) -> httpx.Client:
        h = {"Authorization": f"Bearer {self.tokens[user]}", **headers}
        return httpx.Client(base_url=self.url, headers=h, timeout=10)

    def configure_relay(self, test_relay: Any, /, **overrides: Any) -> dict[str, Any]:
        """Point the establishment at a test relay, with quick retries."""
        settings: dict[str, Any] = {
            "delegation": True,
            "sender": {"name": "Collège Jean Moulin", "address": "ne-pas-repondre@ac-lyon.fr"},
            "allowed_domains": ["ac-lyon.fr"],
            "relay": {"host": test_relay.host, "port": test_relay.port, "security": "none",
                      "auth": "none", "timeout": 5},
            "retry": {"first_delay": 1, "max_delay": 2, "max_age": 3600},
        }
        settings.update(overrides)
        with self.client() as c:
            r = c.put("/api/v1/settings", json=settings)
            assert r.status_code == 200, r.text
            return dict(r.json())

    def wait_status(self, message_id: str, status: str, user: str = "admin",
                    timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        with self.client(user) as c:
            while time.monotonic() < deadline:
                last = c.get(f"/api/v1/messages/{message_id}").json()
                if last.get("status") == status:
                    return last
                time.sleep(0.1)
        raise AssertionError(f"message {message_id} not {status} after {timeout} s: {last}")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def make(data_dir: Path | None = None, provision: bool = True, **env: str) -> ServerProcess:
        s = ServerProcess(data_dir or tmp_path / f"data{len(started)}", env)
        if provision:
            s.provision()
        started.append(s)
        return s

    yield make
    for s in started:
        if s.proc is not None:
            s.kill()


@pytest.fixture
def server(server_factory: Any) -> ServerProcess:
    """A running server with an admin, alice (inside ac-lyon.fr) and bob (gmail.com)."""
    s: ServerProcess = server_factory()
    return s.start()
