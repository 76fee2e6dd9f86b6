"""PostgreSQL stopped for a few seconds, then started again, under a queue: delivery
resumes by itself in every process, and the doors say "try later" meanwhile. The tests
stop a private cluster of their own (support/pg_cluster.py), never the shared one."""

from __future__ import annotations

import asyncio
import base64
import collections
import re
import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography.fernet import Fernet
from reliability_kit import wait_delivered, wait_until

from support.pg_cluster import PrivateCluster, private_pg  # noqa: F401 (fixture)
from support.relay import FaultRelay
from support.server import ServerProcess
from support.workers import start_worker, stop_workers

pytestmark = pytest.mark.postgres
OUTAGE_SECONDS = 5  # the scenario itself: how long the database is away


async def _create_database(cluster: PrivateCluster) -> str:
    conn = await asyncpg.connect(cluster.url, timeout=10)
    try:
        await conn.execute('CREATE DATABASE "postier"')
    finally:
        await conn.close()
    return cluster.url.rsplit("/", 1)[0] + "/postier"


def _ready(server: ServerProcess) -> int:
    try:
        return httpx.get(server.url + "/api/v1/ready", timeout=5).status_code
    except httpx.HTTPError:
        return 0


@pytest.fixture
def outage_setup(private_pg: PrivateCluster, server_factory: Any, tmp_path: Path,  # noqa: F811
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """``postier serve --no-delivery`` on the private cluster, with a shared secret key
    for the ``postier worker`` processes a test starts."""
    url = asyncio.run(_create_database(private_pg))
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("POSTIER_DATABASE_URL", url)
    monkeypatch.setenv("POSTIER_SECRET_KEY", key)
    server: ServerProcess = server_factory(POSTIER_SECRET_KEY=key)
    server.args = ["--no-delivery"]
    server.start()
    workers: list[subprocess.Popen[bytes]] = []
    yield {"cluster": private_pg, "url": url, "server": server, "workers": workers,
           "env": {"POSTIER_SECRET_KEY": key, "POSTIER_RELAY_CONCURRENCY": "4",
                   "POSTIER_POLL_INTERVAL": "30"},
           "tmp": tmp_path}
    if not private_pg.running():
        private_pg.start()
    stop_workers(workers)


def _submit(server: ServerProcess, count: int, prefix: str) -> set[str]:
    msgs = [{"to": [f"{prefix}{i}@example.org"], "subject": f"{prefix}{i}", "text": "Bonjour"}
            for i in range(count)]
    with server.client("alice") as c:
        r = c.post("/api/v1/messages/batch", json={"messages": msgs})
    assert r.status_code == 202, r.text
    return {m["subject"] for m in msgs}


@pytest.mark.timeout(240)
def test_delivery_resumes_by_itself_after_the_database_comes_back(
    outage_setup: dict[str, Any], relay: FaultRelay
) -> None:
    server: ServerProcess = outage_setup["server"]
    cluster: PrivateCluster = outage_setup["cluster"]
    server.configure_relay(relay)
    relay.stall = ("after_data", 0.05)
    workers = outage_setup["workers"]
    logs = []
    for name in ("w0", "w1"):
        proc, log = start_worker(outage_setup["url"], outage_setup["tmp"], name,
                                 outage_setup["env"])
        workers.append(proc)
        logs.append(log)
    wait_until(lambda: all("delivery worker" in log.read_text() for log in logs),
               timeout=30, what="both workers running")
    wanted = _submit(server, 300, "avant")
    relay.wait_for(10, timeout=30)
    cluster.stop()
    stopped_at = time.monotonic()
    try:
        wait_until(lambda: _ready(server) == 503, timeout=15,
                   what="readiness 503 while the database is away")
        # The outage lasts its length whatever the test does meanwhile.
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped_at)))
    finally:
        cluster.start()
    wait_delivered(relay, wanted, timeout=90,
                   what="every queued e-mail delivered after the outage, no restart")
    wait_until(lambda: _ready(server) == 200, timeout=30, what="readiness 200 again")
    assert server.proc is not None and server.proc.poll() is None, "the server stayed up"
    assert all(p.poll() is None for p in workers), "both workers stayed up"
    # Wake-ups work again too (the LISTEN connection was made again): a new e-mail goes
    # out at once, where the workers' polling (every 30 s here) would be far too slow.
    more = _submit(server, 1, "apres")
    wait_delivered(relay, more, timeout=10, what="a new e-mail woken at once")
    for log in logs:
        outages = collections.Counter(re.findall(
            r"postier.core.outage: (.+?): the store is unavailable", log.read_text()))
        assert outages, "the outage is in the worker's log"
        assert set(outages.values()) == {1}, (
            f"each loop logs the outage once, not at every try: {outages}")
        # The alerts' and webhook's rounds too: no stack trace at each round.
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def _tls(server: ServerProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.data_dir / "smtp-cert.pem"))


def _say(c: smtplib.SMTP, command: str) -> tuple[int, str]:
    code, reply = c.docmd(command)
    return code, reply.decode(errors="replace")


@pytest.mark.timeout(120)
def test_every_door_says_try_later_while_the_database_is_away(
    outage_setup: dict[str, Any], relay: FaultRelay
) -> None:
    server: ServerProcess = outage_setup["server"]
    cluster: PrivateCluster = outage_setup["cluster"]
    server.configure_relay(relay)
    # A copier signed in before the outage, in the middle of its session.
    signed_in = smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=15)
    signed_in.starttls(context=_tls(server))
    signed_in.login("alice", "motdepasse-alice")
    web = httpx.Client(base_url=server.url, timeout=15)
    form = web.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf, form.text
    cluster.stop()
    try:
        replies: dict[str, tuple[int, str]] = {}
        with server.client("alice") as c:
            sent = c.post("/api/v1/messages", json={
                "to": ["parent@example.org"], "subject": "Absence", "text": "Bonjour"})
            listed = c.get("/api/v1/messages")
        signing_in = web.post("/login", data={"username": "alice", "password":
                                              "motdepasse-alice", "csrf": csrf.group(1)},
                              headers={"Origin": server.url})
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=15) as fresh:
            replies["EHLO"] = _say(fresh, "EHLO copieur.ac-lyon.fr")
            fresh.starttls(context=_tls(server))
            fresh.ehlo()
            blob = base64.b64encode(b"\0alice\0motdepasse-alice").decode()
            replies["AUTH"] = _say(fresh, f"AUTH PLAIN {blob}")
        replies["MAIL"] = _say(signed_in, "MAIL FROM:<alice.martin@ac-lyon.fr>")
        if replies["MAIL"][0] == 250:
            replies["RCPT"] = _say(signed_in, "RCPT TO:<parent@example.org>")
            replies["DATA"] = _say(signed_in, "DATA")
            if replies["DATA"][0] == 354:
                signed_in.send(b"Subject: Absence\r\n\r\nBonjour\r\n.\r\n")
                code, text = signed_in.getreply()
                replies["DATA"] = code, text.decode(errors="replace")
    finally:
        cluster.start()
        web.close()
    for answer in (sent, listed):
        assert answer.status_code == 503, (answer.status_code, answer.text)
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.json()["error"]["code"] == "store_unavailable", answer.text
        assert int(answer.headers["retry-after"]) > 0
    assert signing_in.status_code == 503, signing_in.text[:500]
    assert signing_in.headers["content-type"].startswith("text/html")
    assert "Traceback" not in signing_in.text and "Errno" not in signing_in.text
    assert replies["AUTH"][0] == 451 and replies["AUTH"][1].startswith("4.3.0"), replies
    for stage, (code, text) in replies.items():
        assert code < 400 or (code == 451 and text.startswith("4.3.0")), (stage, code, text)
        assert "Errno" not in text and "Error" not in text, (stage, text)
    assert any(code == 451 for code, _ in (replies.get("MAIL", (0, "")),
                                            replies.get("DATA", (0, "")))), replies
    signed_in.close()
