"""Running Postier day to day, on a real ``postier serve``: readiness, Prometheus metrics
checked against the queue's real numbers, ``postier doctor`` on a healthy and a broken
installation, and the retention of personal data on e-mails made old in the store."""

from __future__ import annotations

import json
import os
import smtplib
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.relay import FaultRelay
from support.server import ServerProcess

DAY = 86400
MSG: dict[str, Any] = {"subject": "Conseil de classe", "text": "Le conseil a lieu jeudi."}
QUICK = {"first_delay": 1, "max_delay": 2, "max_age": 3600}
SLOW = {"first_delay": 3600, "max_delay": 3600, "max_age": 86400}  # deferred stays deferred


def postier(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "POSTIER_DATA_DIR": str(data_dir), "LANG": "C", "COLUMNS": "250",
            "POSTIER_HOSTNAME": "postier.college-exemple.fr", **env}
    full.pop("LANGUAGE", None)
    full.pop("LC_ALL", None)
    return subprocess.run([sys.executable, "-m", "postier", *args], capture_output=True,
                          text=True, env=full, timeout=60)


@contextmanager
def database(server: ServerProcess) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(server.data_dir / "postier.db", timeout=10, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def send(server: ServerProcess, to: str, user: str = "alice") -> str:
    with server.client(user) as c:
        r = c.post("/api/v1/messages", json={**MSG, "to": [to]})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: ServerProcess, **headers: str) -> Samples:
    r = httpx.get(server.url + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


# -- readiness -------------------------------------------------------------------------------


def test_ready_and_not_ready_when_the_store_is_locked(server_factory: Any) -> None:
    server = server_factory(POSTIER_SQLITE_BUSY_TIMEOUT_MS="300").start()
    r = httpx.get(server.url + "/api/v1/ready")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ready", "store": "ok", "delivery": "running"}

    with database(server) as db:
        db.execute("BEGIN EXCLUSIVE")
        try:
            r = httpx.get(server.url + "/api/v1/ready", timeout=10)
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["status"] == "not_ready" and body["store"] == "unavailable"
            assert body["delivery"] == "running"
            assert any("locked" in p for p in body["problems"]), body
            assert str(server.data_dir) not in r.text  # nothing about the installation
            # Liveness is another question: the process still answers.
            assert httpx.get(server.url + "/api/v1/health").status_code == 200
        finally:
            db.execute("ROLLBACK")
    r = httpx.get(server.url + "/api/v1/ready", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ready"

    # A process that does not deliver is ready without workers.
    server.stop()
    server.args = ["--no-delivery"]
    server.start()
    r = httpx.get(server.url + "/api/v1/ready")
    assert r.status_code == 200 and r.json()["delivery"] == "off"


# -- metrics ---------------------------------------------------------------------------------


def store_numbers(server: ServerProcess) -> dict[str, int]:
    with database(server) as db:
        out = {"accepted": db.execute("SELECT count(*) FROM messages").fetchone()[0]}
        for outcome, n in db.execute("SELECT outcome, count(*) FROM attempts GROUP BY outcome"):
            out[outcome] = n
        for status, n in db.execute("SELECT status, count(*) FROM messages GROUP BY status"):
            out["status." + status] = n
    return out


def settled(server: ServerProcess, timeout: float = 15.0) -> None:
    """Wait until nothing is queued or being sent."""
    def calm() -> bool:
        with database(server) as db:
            return not db.execute(
                "SELECT count(*) FROM messages WHERE status IN ('queued', 'sending')"
            ).fetchone()[0]

    wait_until(calm, timeout)


def test_metrics_follow_the_queue_and_survive_a_restart(
    server_factory: Any, relay: FaultRelay
) -> None:
    token = "mesure-" + "x" * 32
    # 127.0.0.1 is not allowed: only the token opens the metrics.
    server = server_factory(POSTIER_METRICS_ALLOW="192.0.2.0/24",
                            POSTIER_METRICS_TOKEN=token).start()
    auth = {"Authorization": f"Bearer {token}"}
    server.configure_relay(relay, retry=SLOW)
    relay.rcpt_replies["inconnu@example.org"] = "550 5.1.1 No such user"

    sent = [send(server, f"parent{i}@example.org") for i in range(3)]
    failed = [send(server, "inconnu@example.org", user="bob") for _ in range(2)]
    for mid in sent:
        server.wait_status(mid, "sent")
    for mid in failed:
        server.wait_status(mid, "failed")
    settled(server)  # (whatever the failures make Postier send, too, has gone)
    relay.down()
    deferred = [send(server, f"famille{i}@example.org") for i in range(2)]
    for mid in deferred:
        server.wait_status(mid, "deferred")
    settled(server)

    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 403
    assert "POSTIER_METRICS_TOKEN" in r.json()["error"]["hint"]
    r = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer faux"})
    assert r.status_code == 403

    m = scrape(server, **auth)
    real = store_numbers(server)
    assert real["status.failed"] == real["failed"] == 2
    assert real["status.deferred"] == real["deferred"] == 2
    assert real["sent"] == real["status.sent"] >= 3
    est = {"establishment": "default"}
    assert value(m, "postier_messages_accepted_total", **est) == real["accepted"]
    assert value(m, "postier_messages_sent_total", **est) == real["sent"]
    assert value(m, "postier_messages_failed_total", **est) == real["failed"]
    assert value(m, "postier_messages_deferred_total", **est) == real["deferred"]
    assert value(m, "postier_queue_depth", status="deferred") == 2
    assert value(m, "postier_queue_depth", status="queued") == 0
    assert value(m, "postier_queue_depth", status="sending") == 0
    assert 0 < value(m, "postier_oldest_queued_age_seconds") < 60
    assert value(m, "postier_relay_up", relay=f"{relay.host}:{relay.port}") == 0
    assert value(m, "postier_delivery_latency_seconds_count") == real["sent"]
    assert value(m, "postier_delivery_latency_seconds_bucket", le="+Inf") == real["sent"]
    assert value(m, "postier_delivery_latency_seconds_bucket", le="60") == real["sent"]
    assert 0 < value(m, "postier_delivery_latency_seconds_sum") < 60 * real["sent"]
    assert value(m, "postier_delivery_running") == 1

    # The relay comes back; the deferred e-mails go when retried (after the 2 s the
    # delivery engine waits before trying a relay that just refused again).
    relay.up()
    time.sleep(2.2)
    with server.client() as c:
        for mid in deferred:
            assert c.post(f"/api/v1/messages/{mid}/retry").status_code == 200
    for mid in deferred:
        server.wait_status(mid, "sent")
    settled(server)
    m2 = scrape(server, **auth)
    real2 = store_numbers(server)
    assert real2["sent"] == real["sent"] + 2 and real2["deferred"] == 2
    assert value(m2, "postier_messages_sent_total", **est) == real2["sent"]
    assert value(m2, "postier_messages_deferred_total", **est) == 2
    assert value(m2, "postier_messages_accepted_total", **est) == real2["accepted"]
    assert value(m2, "postier_queue_depth", status="deferred") == 0
    assert value(m2, "postier_oldest_queued_age_seconds") == 0
    assert value(m2, "postier_relay_up", relay=f"{relay.host}:{relay.port}") == 1
    assert value(m2, "postier_delivery_latency_seconds_count") == real2["sent"]

    # Counters are the store's: a new process reports the same numbers.
    server.stop()
    server.start()
    m3 = scrape(server, **auth)
    for name in ("accepted", "sent", "deferred", "failed"):
        key = f"postier_messages_{name}_total"
        assert value(m3, key, **est) == value(m2, key, **est), name


# -- doctor ----------------------------------------------------------------------------------


def test_doctor_on_a_healthy_then_a_broken_installation(
    server_factory: Any, relay: FaultRelay
) -> None:
    server = server_factory().start()
    server.configure_relay(relay)
    with server.client() as c:  # a stored secret for the key check
        r = c.post("/api/v1/profiles", json={"label": "Académie", "host": "smtp.ac-lyon.fr",
                                             "auth": "password", "username": "partage",
                                             "password": "secret-partage"})
        assert r.status_code in (200, 201), r.text
    r = postier(server.data_dir, "doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "✗" not in r.stdout and "⚠" not in r.stdout
    assert "nothing was sent" in r.stdout and "decrypts with this key" in r.stdout
    assert relay.messages == []  # greeted, never sent to

    r = postier(server.data_dir, "doctor", "--json")
    assert r.returncode == 0
    assert '"status": "ok"' in r.stdout

    # Broken: the key file readable by everyone, and the relay gone.
    key = server.data_dir / "secret.key"
    key.chmod(0o644)
    relay.down()
    r = postier(server.data_dir, "doctor")
    assert r.returncode == 2, r.stdout
    assert "✗" in r.stdout and "chmod 600" in r.stdout
    r = postier(server.data_dir, "doctor", "--json")
    assert r.returncode == 2
    report = json.loads(r.stdout)
    problems = {c["key"]: c for c in report["checks"] if c["level"] != "ok"}
    assert report["status"] == "fail" and set(problems) == {"key_file", "relay"}, problems
    assert problems["key_file"]["remedy"] == f"Run: chmod 600 {key}"
    assert "connection refused" in problems["relay"]["result"]
    assert problems["relay"]["remedy"] == (
        "Check the port number and that the SMTP server is running.")
    r = postier(server.data_dir, "doctor", "--json", LANG="fr_FR.UTF-8")
    fr = {c["key"]: c for c in json.loads(r.stdout)["checks"]}
    assert fr["key_file"]["remedy"] == f"Exécutez : chmod 600 {key}"
    assert fr["key_file"]["label"] == "Fichier de la clé secrète"


# -- retention -------------------------------------------------------------------------------


def age(server: ServerProcess, days: float, ids: list[str]) -> None:
    """Make e-mails look ``days`` old: accepted and finished that long ago."""
    then = time.time() - days * DAY
    with database(server) as db:
        marks = ",".join("?" * len(ids))
        db.execute(f"UPDATE messages SET created_at = ?, updated_at = ? WHERE id IN ({marks})",
                   [then - 60, then, *ids])
        db.execute(f"UPDATE attempts SET started_at = ? WHERE message_id IN ({marks})",
                   [then - 30, *ids])


def snapshot(server: ServerProcess) -> dict[str, Any]:
    with database(server) as db:
        return {
            table: sorted(db.execute(f"SELECT {key} FROM {table}").fetchall())
            for table, key in (("messages", "id, status, updated_at"),
                               ("message_bodies", "message_id"),
                               ("recipients", "message_id, position"),
                               ("attempts", "id"))
        }


def wait_until(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not done in time"
        time.sleep(0.1)


def test_retention_removes_bodies_then_records_of_final_emails_only(
    server_factory: Any, relay: FaultRelay
) -> None:
    server = server_factory(POSTIER_RETENTION_INTERVAL="1").start()
    server.configure_relay(relay, retry=SLOW)
    relay.rcpt_replies["plus-tard@example.org"] = "451 4.3.0 Try again later"
    sent = [send(server, f"parent{i}@example.org") for i in range(3)]
    waiting = send(server, "plus-tard@example.org")
    cancelled = send(server, "plus-tard@example.org")
    for mid in sent:
        server.wait_status(mid, "sent")
    server.wait_status(waiting, "deferred")
    server.wait_status(cancelled, "deferred")
    with server.client("alice") as c:
        assert c.post(f"/api/v1/messages/{cancelled}/cancel").status_code == 200
    final = [*sent, cancelled]
    everyone = [*final, waiting]

    # 40 days later: past the body retention (30), not the record's (365).
    server.stop()
    age(server, 40, everyone)
    before = snapshot(server)
    r = postier(server.data_dir, "purge", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "Dry run: 4 e-mail bodies and 0 e-mail records would be removed" in r.stdout
    assert snapshot(server) == before  # a dry run changes nothing

    r = postier(server.data_dir, "purge")
    assert r.returncode == 0, r.stderr
    assert "4 e-mail bodies and 0 e-mail records removed" in r.stdout
    after = snapshot(server)
    assert after["message_bodies"] == [(waiting,)]  # the waiting e-mail keeps its body
    assert after["messages"] == before["messages"]
    assert after["recipients"] == before["recipients"]
    assert after["attempts"] == before["attempts"]

    server.start()
    with httpx.Client(base_url=server.url) as web:  # a wrong password on the sign-in page
        csrf = web.get("/login").cookies["postier_login_csrf"]
        assert web.post("/login", data={"username": "alice", "password": "faux",
                                        "csrf": csrf}).status_code == 401
    # ...and in SMTP AUTH, under her address in another case (smtplib tries PLAIN, LOGIN).
    tls = ssl.create_default_context(cafile=str(server.data_dir / "smtp-cert.pem"))
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=tls)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("Alice.MARTIN@ac-lyon.fr", "faux")
    with server.client("alice") as c:
        assert c.get(f"/api/v1/messages/{sent[0]}").json()["status"] == "sent"
        data = c.get("/api/v1/me/data").json()
    assert [f["door"] for f in data["failed_sign_ins"]] == ["web", "smtp", "smtp"]
    assert data["retention"]["body_days"] == 30
    assert data["retention"]["metadata_days"] == 365
    shown = {m["id"]: m for m in data["messages"]}
    assert set(shown) == set(everyone)
    assert not shown[sent[0]]["body_kept"] and shown[waiting]["body_kept"]
    assert shown[sent[0]]["recipients"][0]["address"] == "parent0@example.org"
    assert shown[sent[0]]["metadata_removal_at"] is not None
    assert shown[waiting]["metadata_removal_at"] is None  # not final: kept while it waits
    with server.client("admin") as c:
        export = c.get("/api/v1/users/alice/data")
        assert export.status_code == 200
        assert "attachment" in export.headers["content-disposition"]
        assert len(export.json()["messages"]) == 5
        assert any(a["action"] == "user.data_export" for a in c.get("/api/v1/audit").json())
    with server.client("bob") as c:
        assert c.get("/api/v1/users/alice/data").status_code == 403

    # The counters before the records go; they must not go down after.
    est = {"establishment": "default"}
    m1 = scrape(server)

    # 400 days later: the background purge removes the records of the final e-mails.
    age(server, 400, everyone)
    wait_until(lambda: len(snapshot(server)["messages"]) == 1)
    after = snapshot(server)
    assert [row[0] for row in after["messages"]] == [waiting]
    assert after["message_bodies"] == [(waiting,)]
    assert {row[0] for row in after["recipients"]} == {waiting}
    with database(server) as db:
        left = {mid for (mid,) in db.execute("SELECT message_id FROM attempts")}
        purges = db.execute(
            "SELECT actor, details FROM audit_log WHERE action = 'retention.purge'").fetchall()
    assert left == {waiting}
    assert [actor for actor, _ in purges] == ["retention"] and '"messages": 4' in purges[0][1]
    with server.client("alice") as c:
        assert c.get(f"/api/v1/messages/{sent[0]}").status_code == 404
        assert [m["id"] for m in c.get("/api/v1/me/data").json()["messages"]] == [waiting]

    m2 = scrape(server)
    server.stop()
    server.start()
    m3 = scrape(server)
    for name in ("accepted", "sent", "deferred"):
        key = f"postier_messages_{name}_total"
        assert value(m1, key, **est) == value(m2, key, **est) == value(m3, key, **est), name
    assert value(m3, "postier_messages_accepted_total", **est) == 5
    assert value(m3, "postier_delivery_latency_seconds_count") == 3
