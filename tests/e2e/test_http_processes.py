"""``postier serve --http-processes N``: the HTTP API and web pages answered by N processes
sharing the port. While the main process cannot answer (stopped), its HTTP children
still accept e-mails durably, and they are delivered as soon as it runs again (the
children's wake-ups reach delivery through it, not a poll); sign-in throttling holds
whichever process answers; another server cannot take the same port; a killed child comes
back; every child ends with the server, even when the server is killed; on PostgreSQL, no
child shows the database password on its command line."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from postier.core.service import Postier
from postier.server.config import ServerConfig

from support.relay import FaultRelay
from support.server import ServerProcess, alive, child_processes


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(what)


def _submit(server: ServerProcess, subject: str, timeout: float = 10) -> str:
    # A new connection each time: the kernel hands it to one of the processes.
    r = httpx.post(server.url + "/api/v1/messages", timeout=timeout,
                   headers={"Authorization": f"Bearer {server.tokens['alice']}"},
                   json={"to": ["parent@example.org"], "subject": subject, "text": "Bonjour"})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_children_answer_wake_delivery_and_come_back(
    server_factory: Any, relay: FaultRelay, tmp_path: Path
) -> None:
    # Polling every 60 s: an e-mail delivered within seconds was woken, not polled.
    server: ServerProcess = server_factory(POSTIER_HTTP_PROCESSES="3",
                                           POSTIER_POLL_INTERVAL="60").start()
    server.configure_relay(relay)
    parent = server.proc.pid  # type: ignore[union-attr]
    _wait(lambda: len(child_processes(parent, b"http-process")) == 2, 20,
          "two HTTP processes were expected")
    _wait(lambda: "HTTP process 2 answering" in server.log()
          and "HTTP process 1 answering" in server.log(), 20, "the children did not start")
    assert httpx.get(server.url + "/api/v1/ready").json()["delivery"] == "running"

    first = _submit(server, "avant")
    server.wait_status(first, "sent", user="alice", timeout=10)

    # The main process stopped: the connections the kernel gives its children are
    # answered, those it gives the main process wait for it.
    os.kill(parent, signal.SIGSTOP)
    try:
        ids = []
        for i in range(8):
            try:
                ids.append(_submit(server, f"pendant-{i}", timeout=2))
            except httpx.TimeoutException:
                pass
    finally:
        os.kill(parent, signal.SIGCONT)
    assert ids, "no HTTP child answered while the main process was stopped"
    for message_id in ids:
        server.wait_status(message_id, "sent", user="alice", timeout=10)
    subjects = {str(m.message["Subject"]) for m in relay.messages}
    assert subjects <= {"avant"} | {f"pendant-{i}" for i in range(8)}
    assert len(relay.messages) == len(subjects), "an e-mail was delivered twice"

    # Sign-in throttling is counted in the store: five wrong passwords, spread over the
    # processes, and the sixth try waits even with the right password.
    codes = []
    for i in range(6):
        with httpx.Client(base_url=server.url) as web:
            csrf = web.get("/login").cookies["postier_login_csrf"]
            password = "motdepasse-alice" if i == 5 else "faux"
            codes.append(web.post("/login", data={
                "username": "alice", "password": password, "csrf": csrf}).status_code)
    assert codes == [401] * 5 + [429], codes

    # Another server on the same port is refused, though the sockets allow sharing it.
    other = subprocess.run(
        [sys.executable, "-m", "postier", "serve", "--data-dir", str(tmp_path / "other"),
         "--http", f"127.0.0.1:{server.port}", "--http-processes", "2", "--smtp", "off",
         "--no-delivery"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "200"})
    assert other.returncode == 1
    assert f"Cannot listen on 127.0.0.1:{server.port}: Address already in use" in other.stderr

    # A child killed comes back; the API answers meanwhile.
    victim = child_processes(parent, b"http-process")[0]
    os.kill(victim, signal.SIGKILL)
    _submit(server, "apres")
    _wait(lambda: len(child_processes(parent, b"http-process")) == 2
          and victim not in child_processes(parent, b"http-process"), 20,
          "the child did not return")
    assert "ended with status -9; starting it again" in server.log()

    # SIGINT (a Ctrl-C) is the server's to answer: the children wait for it to stop them,
    # after their requests.
    _wait(lambda: server.log().count(" answering (pid ") == 3, 20,
          "the restarted child did not answer")
    children = child_processes(parent, b"http-process")
    for pid in children:
        os.kill(pid, signal.SIGINT)
    time.sleep(1)
    assert all(alive(pid) for pid in children), "an HTTP process stopped on its own"
    assert httpx.get(server.url + "/api/v1/health").status_code == 200
    assert server.stop(signal.SIGINT) == 0
    assert not any(alive(pid) for pid in children), "an HTTP process outlived the server"


def test_children_stop_when_the_server_is_killed(server_factory: Any) -> None:
    server: ServerProcess = server_factory(POSTIER_HTTP_PROCESSES="2").start()
    parent = server.proc.pid  # type: ignore[union-attr]
    _wait(lambda: "HTTP process 1 answering" in server.log(), 20, "the child did not start")
    (child,) = child_processes(parent, b"http-process")
    server.kill()
    _wait(lambda: not alive(child), 20, "the HTTP process outlived a killed server")
    assert "HTTP process 1: the server is gone; stopping" in server.log()
    # The port is free again for the next server.
    again = ServerProcess(server.data_dir, {"POSTIER_HTTP_PROCESSES": "2"})
    again.port, again.url = server.port, server.url
    again.tokens = server.tokens
    try:
        again.start()
        assert httpx.get(again.url + "/api/v1/health").status_code == 200
    finally:
        again.stop()


async def _provision_pg(data_dir: Path, url: str) -> dict[str, str]:
    core = Postier(ServerConfig(data_dir=data_dir, database_url=url))
    await core.open()
    try:
        alice = await core.add_user("alice", "alice.martin@ac-lyon.fr", role="user",
                                    display_name="Alice Martin", password="motdepasse-alice")
        admin = await core.add_user("admin", "direction@ac-lyon.fr", role="admin",
                                    password="motdepasse-admin")
        return {"alice": (await core.create_token(alice, "t"))[0],
                "admin": (await core.create_token(admin, "t"))[0]}
    finally:
        await core.close()


def test_on_postgresql_the_children_keep_the_password_out_of_the_process_list(
    pg_url: str, relay: FaultRelay, tmp_path: Path
) -> None:
    # With a password (trust authentication lets it through): no child shows it to `ps`.
    url = pg_url.replace("postgres@", "postgres:Mot2passe-secret@", 1)
    server = ServerProcess(tmp_path / "data", {"POSTIER_HTTP_PROCESSES": "2",
                                                "POSTIER_DELIVERY_PROCESSES": "1"})
    server.tokens = asyncio.run(_provision_pg(server.data_dir, url))
    server.args = ["--database-url", url]
    try:
        server.start()
        server.configure_relay(relay)
        parent = server.proc.pid  # type: ignore[union-attr]
        _wait(lambda: "HTTP process 1 answering" in server.log(), 20, "no HTTP child")
        children = child_processes(parent, b"postier")
        assert len(children) == 2, children  # one HTTP process, one delivery process
        for pid in children:
            assert b"Mot2passe" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        ids = [_submit(server, f"pg-{i}") for i in range(6)]
        for message_id in ids:
            server.wait_status(message_id, "sent", user="alice", timeout=15)
        assert server.stop() == 0
    finally:
        if server.proc is not None:
            server.kill()
