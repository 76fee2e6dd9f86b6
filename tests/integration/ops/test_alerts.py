"""Alerts and the webhook with real parts: a real relay that refuses connections, a real
delivery worker and store (SQLite and PostgreSQL), and a real HTTP receiver on 127.0.0.1
that checks each event's signature as an integrator would.

The engine's checks are driven with an explicit clock instead of sleeping through the
thresholds: ``engine.check(now=...)`` is what the background task calls every 30 s.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from postier.core.message import MessageIn
from postier.core.queue_entry import SYSTEM_USER
from postier.core.service import Postier
from postier.delivery.pool import RelayPool
from postier.delivery.worker import DeliveryWorker
from postier.errors import Forbidden
from postier.ops import alerts
from postier.server.config import ServerConfig
from postier.store import alerts as db
from postier.store import schema
from postier.store.base import User

from support.relay import FaultRelay
from support.server import ServerProcess

SECRET = "un-secret-partage-de-test-0123456789"


class Receiver:
    """A tiny webhook receiver: checks the signature and the timestamp of every POST."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.events: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/postier-hook"

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stamp = self.headers.get("X-Postier-Timestamp", "")
                given = self.headers.get("X-Postier-Signature", "")
                expected = "sha256=" + hmac.new(receiver.secret.encode(),
                                                stamp.encode() + b"." + body,
                                                hashlib.sha256).hexdigest()
                fresh = stamp.isdigit() and abs(time.time() - int(stamp)) < 300
                if not (hmac.compare_digest(given, expected) and fresh):
                    receiver.refused.append(given)
                    self.send_response(401)
                else:
                    receiver.events.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.down()


class Installation:
    def __init__(self, core: Postier, admin: User, alice: User) -> None:
        self.core = core
        self.admin = admin
        self.alice = alice
        self.worker: DeliveryWorker | None = None
        self.task: alerts.AlertTask | None = None

    async def start_worker(self) -> alerts.AlertTask:
        self.worker = DeliveryWorker(self.core.store, self.core.delivery_settings,
                                     pool=RelayPool(concurrency=2, down_for=0.2),
                                     poll_interval=0.05, on_failure=self.core.failure_notice,
                                     on_delay=self.core.delay_notice)
        self.task = alerts.attach(self.core, self.worker)
        self.core.on_accept(self.worker.notify)
        await self.worker.start()
        return self.task

    async def stop(self) -> None:
        if self.task is not None:
            await self.task.stop()
        if self.worker is not None:
            await self.worker.stop(grace=2)

    async def wait_status(self, mid: str, status: str, timeout: float = 15) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = await self.core.store.get_message(mid)
            if rec is not None and rec.status == status:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{mid} is not {status}: {rec}")

    async def alert_emails(self) -> list[Any]:
        found = await self.core.store.list_messages(establishment_id=1, user_id=SYSTEM_USER,
                                                    limit=100)
        return [m for m in found if "Postier alert" in m.subject]


async def _installation(data_dir: Path, url: str | None, relay: FaultRelay,
                        receiver_url: str) -> Installation:
    core = Postier(ServerConfig(data_dir=data_dir, database_url=url, hostname="ac-lyon.fr"))
    await core.open()
    admin = await core.add_user("direction", "direction@ac-lyon.fr", role="admin")
    await core.add_user("adjoint", "adjoint@ac-lyon.fr", role="admin")
    alice = await core.add_user("alice", "alice.martin@ac-lyon.fr")
    await core.put_settings(admin, {
        "sender": {"name": "Collège Jean Moulin", "address": "ne-pas-repondre@ac-lyon.fr"},
        "allowed_domains": ["ac-lyon.fr"],
        "relay": {"host": relay.host, "port": relay.port, "security": "none", "timeout": 2},
        "retry": {"first_delay": 1, "max_delay": 1, "max_age": 3600},
        "alerts": {"webhook_url": receiver_url, "webhook_secret": SECRET},
    })
    return Installation(core, admin, alice)


@pytest.fixture
async def inst(store_url: str, tmp_path: Path, relay: FaultRelay, receiver: Receiver
               ) -> AsyncIterator[Installation]:
    url = None if store_url.startswith("sqlite") else store_url
    i = await _installation(tmp_path, url, relay, receiver.url)
    yield i
    await i.stop()
    await i.core.close()


async def test_a_long_relay_outage_is_announced_once_when_it_starts_and_once_when_over(
    inst: Installation, relay: FaultRelay, receiver: Receiver
) -> None:
    relay.down()  # connections refused
    task = await inst.start_worker()
    (sent,) = await inst.core.submit(inst.alice, [MessageIn.model_validate(
        {"to": ["parent@example.org"], "subject": "Conseil de classe"})])
    await inst.wait_status(sent.id, "deferred")
    engine = task.engine
    t0 = time.time()
    assert await engine.check(now=t0 + 60) == [], "a minute of failures is no incident yet"

    # The outage goes on: checked every 30 s for an hour, by this worker and by another
    # one that sees the same relay fail (same store, its own pool).
    other_pool = RelayPool(concurrency=1, down_for=0.2)
    settings = await inst.core.delivery_settings(1)
    tried = await other_pool.send(settings.relay, "x@ac-lyon.fr", ["p@example.org"],
                                  b"Subject: x\r\n\r\nx\r\n")
    assert tried.error is not None and tried.error.code == "refused"
    other = alerts.AlertEngine(inst.core, other_pool)
    announced: list[tuple[str, db.Incident]] = []
    for step in range(120):
        now = t0 + 1000 + 30 * step
        announced += await engine.check(now=now)
        announced += await other.check(now=now)
    assert [(phase, i.kind) for phase, i in announced] == [("raised", "relay_failing")]
    incident = announced[0][1]
    assert (await alerts.list_alerts(inst.core, inst.admin, "fr"))[0]["status"] == "open"
    assert [m.subject for m in await inst.alert_emails()] == [
        "Alerte Postier / Postier alert : Le relais ne répond plus / The relay is failing"]
    assert await task.sender.deliver_due() == 1
    assert receiver.types() == ["alert.raised"] and receiver.refused == []
    assert receiver.events[0]["data"]["kind"] == "relay_failing"
    assert receiver.events[0]["establishment"] == "default"

    # The relay comes back: the waiting e-mails leave, the incident is over, said once.
    relay.up()
    await inst.wait_status(sent.id, "sent")
    later = t0 + 5000
    over = []
    for step in range(20):
        over += await engine.check(now=later + 30 * step)
        over += await other.check(now=later + 30 * step)
    # The other worker has not seen the relay come back yet (its probe runs every few
    # seconds): its view of the same outage does not raise a second incident.
    assert other_pool.failing_for(settings.relay) > 0
    assert [(phase, i.id) for phase, i in over] == [("resolved", incident.id)]
    assert await task.sender.deliver_due() == 1
    assert await task.sender.deliver_due() == 0
    assert receiver.types() == ["alert.raised", "alert.resolved"]

    # What the administrators received from the relay: one e-mail per phase, to each of
    # them (not to alice), in French and in English.
    await relay.wait_for_async(3)  # alice's e-mail and the two alerts
    await asyncio.sleep(0.5)  # nothing more comes
    mails = [m for m in relay.messages if "X-Postier-Alert" in m.message]
    assert sorted(m.message["X-Postier-Alert"] for m in mails) == [
        "relay_failing; raised", "relay_failing; resolved"]
    for m in mails:
        assert sorted(m.rcpt_tos) == ["adjoint@ac-lyon.fr", "direction@ac-lyon.fr"]
    [first] = [m for m in mails if m.message["X-Postier-Alert"].endswith("raised")]
    text = first.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Que faire :" in text and "What to do:" in text, text
    assert (await alerts.list_alerts(inst.core, inst.admin, "en"))[0]["status"] == "resolved"


async def test_an_unreachable_receiver_gets_the_event_later_even_after_a_restart(
    store_url: str, tmp_path: Path, relay: FaultRelay, receiver: Receiver
) -> None:
    url = None if store_url.startswith("sqlite") else store_url
    inst = await _installation(tmp_path, url, relay, receiver.url)
    expires = (dt.date.today() + dt.timedelta(days=3)).isoformat()
    await inst.core.put_settings(inst.admin, {"relay": {
        "auth": "oauth2", "username": "envoi@ac-lyon.fr", "oauth2_client_id": "id",
        "oauth2_client_secret": "secret", "oauth2_secret_expires": expires}})
    receiver.down()
    engine = alerts.AlertEngine(inst.core, None)
    now = time.time()
    raised = await engine.check(now=now)
    assert [(p, i.kind) for p, i in raised] == [("raised", "oauth2_expiry")]
    sender = alerts.WebhookSender(inst.core)
    assert await sender.deliver_due(now) == 0, "the receiver is down"
    assert await sender.deliver_due(now + 1) == 0, "not due again before its backoff"
    [row] = await inst.core.store.list_events(1)
    assert row["status"] == "pending" and row["attempts"] == 1 and row["last_error"]
    await sender.close()
    await inst.core.close()

    # Postier restarts; the receiver is back: the stored event goes out, once.
    receiver.up()
    core = Postier(ServerConfig(data_dir=tmp_path, database_url=url, hostname="ac-lyon.fr"))
    await core.open()
    try:
        sender = alerts.WebhookSender(core)
        assert await sender.deliver_due(now + alerts.backoff(1) + 1) == 1
        assert await sender.deliver_due(now + 3600) == 0
        await sender.close()
        assert receiver.types() == ["alert.raised"] and receiver.refused == []
        assert receiver.events[0]["data"]["kind"] == "oauth2_expiry"
        assert expires in receiver.events[0]["data"]["message"]
    finally:
        await core.close()


async def test_failure_and_sent_events_reach_the_integrator(
    inst: Installation, relay: FaultRelay, receiver: Receiver
) -> None:
    await inst.core.put_settings(inst.admin, {"alerts": {
        "webhook_events": ["failures", "sent"]}})
    relay.rcpt_replies = {"inconnu@example.org": "550 5.1.1 No such user"}
    task = await inst.start_worker()
    (bad,) = await inst.core.submit(inst.alice, [MessageIn.model_validate(
        {"to": ["inconnu@example.org"], "subject": "Sortie", "idempotency_key": "app-42"})])
    (good,) = await inst.core.submit(inst.alice, [MessageIn.model_validate(
        {"to": ["parent@example.org"], "subject": "Réunion"})])
    await inst.wait_status(bad.id, "failed")
    await inst.wait_status(good.id, "sent")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(receiver.events) < 2:
        await task.sender.deliver_due()
        await asyncio.sleep(0.1)
    by_type = {e["type"]: e["data"]["message"] for e in receiver.events}
    assert sorted(by_type) == ["message.failed", "message.sent"], receiver.types()
    failed = by_type["message.failed"]
    assert failed["id"] == bad.id and failed["idempotency_key"] == "app-42"
    assert failed["recipients"][0]["code"] == 550
    assert by_type["message.sent"]["id"] == good.id
    # The failure notice to alice is Postier's own e-mail: no event about it.
    await asyncio.sleep(0.5)
    await task.sender.deliver_due()
    assert len(receiver.events) == 2, receiver.types()


async def test_the_webhook_secret_is_write_only_and_encrypted(inst: Installation) -> None:
    shown = await inst.core.get_settings(inst.admin)
    assert shown["alerts"]["webhook_secret_set"] is True
    assert SECRET not in json.dumps(shown)
    # Shown settings can be saved back as they are: the secret stays.
    await inst.core.put_settings(inst.admin, {**shown, "alerts": {**shown["alerts"],
                                                                  "email": False}})
    assert (await inst.core.stored_settings(1)).alerts.webhook_secret == SECRET
    # The audit log says that the secret was set, never what it is.
    changes = [e.details["changed"] for e in await inst.core.store.list_audit(1)
               if e.action == "settings.update"]
    assert "alerts.webhook_secret" in changes[-1], changes
    assert all("alerts.webhook_secret" not in c for c in changes[:-1]), "kept, not changed"
    stored = await inst.core.store._read(select(schema.settings.c.data))  # type: ignore[attr-defined]
    assert SECRET not in stored[0].data and "webhook_secret_enc" in stored[0].data
    with pytest.raises(Exception, match="16"):
        await inst.core.put_settings(inst.admin, {"alerts": {"webhook_secret": ""}})


async def test_alerts_are_for_the_establishment_administrators_only(
    inst: Installation,
) -> None:
    await inst.core.store.open_incident(1, "queue_behind", time.time(),
                                        {"params": {"accepted": "x", "count": 3}})
    other = await inst.core.add_establishment("lycee-du-parc", "Lycée du Parc")
    their_admin = await inst.core.add_user("proviseur", "p@lyceeduparc.fr", role="admin",
                                           establishment_id=other.id)
    assert len(await alerts.list_alerts(inst.core, inst.admin, "fr")) == 1
    assert await alerts.list_alerts(inst.core, their_admin, "fr") == []
    with pytest.raises(Forbidden):
        await alerts.list_alerts(inst.core, inst.alice, "fr")


def test_the_banner_shows_an_open_incident_to_administrators_only(
    server_factory: Any,
) -> None:
    server: ServerProcess = server_factory()  # provisioned, started below
    server.args = ["--no-delivery"]

    async def raise_incident() -> None:
        core = Postier(ServerConfig(data_dir=server.data_dir))
        await core.open()
        await core.store.open_incident(1, "relay_failing", time.time(), {
            "params": {"relay": "smtp.ac-lyon.fr:587", "since": "2026-11-27 08:00 UTC"}})
        await core.close()

    asyncio.run(raise_incident())
    server.start()

    def page(username: str) -> str:
        with httpx.Client(base_url=server.url, headers={"Accept-Language": "fr"}) as web:
            form = web.get("/login").text
            csrf = re.search(r'name="csrf" value="([^"]+)"', form)
            assert csrf is not None
            r = web.post("/login", data={"username": username, "csrf": csrf.group(1),
                                         "password": "motdepasse-" + username},
                         follow_redirects=True)
            assert r.status_code == 200, r.text[:300]
            return web.get("/mine").text

    admin = page("admin")
    assert 'class="alert-banner"' in admin
    assert "Le relais smtp.ac-lyon.fr:587 ne répond plus depuis le 2026-11-27 08:00 UTC" in admin
    assert 'class="alert-banner"' not in page("alice")
    r = httpx.get(server.url + "/api/v1/alerts",
                  headers={"Authorization": f"Bearer {server.tokens['admin']}"})
    assert r.status_code == 200 and r.json()[0]["kind"] == "relay_failing"
    # At the console, for cron: exit status 1 while an incident is open.
    listed = subprocess.run([sys.executable, "-m", "postier", "alerts", "list", "--json",
                             "--data-dir", str(server.data_dir)],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 1, listed.stderr
    assert [a["kind"] for a in json.loads(listed.stdout)] == ["relay_failing"]
