"""A running Postier server as tests see it, wherever it runs (its own process or a thread
of the test process): its address, the accounts provisioned in it, HTTP clients signed in
as them."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from postier.core.service import Postier
from postier.server.config import ServerConfig


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def provision_accounts(data_dir: Path) -> dict[str, str]:
    """admin, alice (inside ac-lyon.fr) and bob (gmail.com) in the store of ``data_dir``,
    and a token for each, by username."""
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


class ProvisionedTemplate:
    """A data directory provisioned once per test process, copied into each new server's.

    Hashing three passwords (argon2, made to be slow) and creating the store costs about a
    second of CPU, and seconds of waiting on a busy machine; a copy costs a few
    milliseconds. The copy is the store and secret key the provisioning made, so each
    server starts on the same data as if provisioned itself; only the tokens and the key
    are the same from one server to the next. It serves the default store only (SQLite in
    the data directory, the key file beside it): with another database or key in the
    environment, each server is provisioned itself.
    """

    OWN_STORE = ("POSTIER_DATABASE_URL", "POSTIER_SECRET_KEY", "POSTIER_SECRET_KEY_FILE")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.path: Path | None = None
        self.tokens: dict[str, str] = {}

    def usable_for(self, data_dir: Path) -> bool:
        fresh = not data_dir.exists() or not any(data_dir.iterdir())
        return fresh and not any(os.environ.get(name) for name in self.OWN_STORE)

    def copy_to(self, data_dir: Path) -> dict[str, str]:
        with self.lock:
            if self.path is None:
                path = Path(tempfile.mkdtemp(prefix="postier-provisioned-"))
                atexit.register(shutil.rmtree, path, ignore_errors=True)
                self.tokens = asyncio.run(provision_accounts(path / "data"))
                self.path = path / "data"
        shutil.copytree(self.path, data_dir, dirs_exist_ok=True)
        return dict(self.tokens)


TEMPLATE = ProvisionedTemplate()


class PostierServer:
    """What a test sees of a running server, wherever it runs: its address, the accounts
    provisioned in it, and HTTP clients signed in as them."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.smtp_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tokens: dict[str, str] = {}

    def provision(self) -> dict[str, str]:
        """The admin, alice and bob accounts, and a token for each. In a thread of its own:
        the test's thread may be running an event loop (Playwright's does)."""
        with ThreadPoolExecutor(1) as pool:
            if TEMPLATE.usable_for(self.data_dir):
                self.tokens = pool.submit(TEMPLATE.copy_to, self.data_dir).result()
            else:
                self.tokens = pool.submit(asyncio.run,
                                          provision_accounts(self.data_dir)).result()
        return self.tokens

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
