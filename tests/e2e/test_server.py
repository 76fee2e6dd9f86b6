"""The server as a user meets it: real HTTP, a real relay; ``postier serve`` in the test
process (marked ``in_process``), in its own process where that is the subject (a kill, a
SIGTERM, a failed start-up).

alice.martin@ac-lyon.fr is inside the allowed domain ac-lyon.fr; bob.durand@gmail.com is
outside it, so his e-mails leave with the establishment's sender and his address as
Reply-To.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from support.relay import FaultRelay
from support.server import PostierServer, ServerProcess

pytestmark = pytest.mark.in_process

MSG: dict[str, Any] = {
    "to": ["parent.eleve@example.org"],
    "subject": "Changement d'emploi du temps",
    "text": "Le cours de mathématiques de jeudi est déplacé en salle 12.",
}


def test_health_without_authentication(server: PostierServer) -> None:
    r = httpx.get(server.url + "/api/v1/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert "/api/v1/messages" in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_inside_allowed_domain_sender_kept(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay)
    with server.client("alice") as c:
        r = c.post("/api/v1/messages", json=MSG)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    server.wait_status(r.json()["id"], "sent", user="alice")
    (got,) = relay.wait_for(1)
    assert got.mail_from == "alice.martin@ac-lyon.fr"
    assert got.message["From"] == "Alice Martin <alice.martin@ac-lyon.fr>"
    assert got.message["Reply-To"] is None
    assert got.message["Subject"] == MSG["subject"]
    assert got.rcpt_tos == ["parent.eleve@example.org"]


def test_outside_allowed_domains_uses_establishment_sender(
    server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay)
    with server.client("bob") as c:
        r = c.post("/api/v1/messages", json={**MSG, "bcc": ["cachee@example.org"]})
    assert r.status_code == 202, r.text
    (got,) = relay.wait_for(1)
    assert got.mail_from == "ne-pas-repondre@ac-lyon.fr"
    assert "ne-pas-repondre@ac-lyon.fr" in got.message["From"]
    assert "Coll" in got.message["From"]
    assert got.message["Reply-To"] == "bob.durand@gmail.com"
    assert sorted(got.rcpt_tos) == ["cachee@example.org", "parent.eleve@example.org"]
    assert got.message["Bcc"] is None and b"cachee@example.org" not in got.data


def test_cannot_send_as_someone_else(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay)
    with server.client("alice", **{"Accept-Language": "fr-FR,fr;q=0.9"}) as c:
        r = c.post("/api/v1/messages", json={**MSG, "from": "direction@ac-lyon.fr"})
        assert r.status_code == 403
        err = r.json()["error"]
        assert err["code"] == "sender_forbidden"
        assert "direction@ac-lyon.fr" in err["message"]
        assert "alice.martin@ac-lyon.fr" in err["message"]
        assert c.get("/api/v1/messages").json() == []


def test_bad_input_is_refused_and_nothing_stored(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay)
    with server.client("alice") as c:
        bad = ["parent@example.org", "pas une adresse"]
        r = c.post("/api/v1/messages", json={**MSG, "to": bad})
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["field"] == "to.1", err
        assert "pas une adresse" in err["message"]
        r = c.post("/api/v1/messages", json={**MSG, "subject": "Hi\r\nBcc: victim@example.org"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "subject"
        r = c.post("/api/v1/messages", json={**MSG, "headers": {"Bcc": "x@example.org"}})
        assert r.status_code == 422
        r = c.post("/api/v1/messages", json={"subject": "no recipient"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "to"
        # A body that is not JSON, and JSON with a lone surrogate in the subject (read as
        # Python reads it, then refused as no valid text): 422s that say what is wrong.
        for body in (b'{"to": ["a@example.org"], "subject": "x",}',
                     b'{"to": ["a@example.org"], "subject": "\\ud800"}'):
            r = c.post("/api/v1/messages/batch", content=b'{"messages": [' + body + b"]}",
                       headers={"Content-Type": "application/json"})
            assert r.status_code == 422, r.text
            assert r.json()["error"]["message"], r.text
        assert r.json()["error"]["field"] == "messages.0.subject", r.text
        assert c.get("/api/v1/messages").json() == []
    time.sleep(0.5)
    assert relay.messages == []


def test_batch_is_all_or_nothing(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay)
    good = [{**MSG, "to": [f"famille{i}@example.org"]} for i in range(50)]
    with server.client("alice") as c:
        r = c.post("/api/v1/messages/batch", json={"messages": [*good, {**MSG, "to": ["@@"]}]})
        assert r.status_code == 422
        assert r.json()["error"]["field"].startswith("messages.50")
        assert c.get("/api/v1/messages").json() == []
        r = c.post("/api/v1/messages/batch", json={"messages": good})
        assert r.status_code == 202, r.text
        ids = [m["id"] for m in r.json()["messages"]]
    assert len(set(ids)) == 50
    relay.wait_for(50)
    for mid in ids[-3:]:
        server.wait_status(mid, "sent", user="alice")


def test_message_status_shows_recipients_and_attempts(
    server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay)
    relay.rcpt_replies = {"inconnu@example.org": "550 5.1.1 No such user here"}
    with server.client("alice", **{"Accept-Language": "fr"}) as c:
        r = c.post("/api/v1/messages", json={**MSG, "to": ["ok@example.org",
                                                             "inconnu@example.org"]})
        mid = r.json()["id"]
        m = server.wait_status(mid, "sent", user="alice")
    by = {x["address"]: x for x in m["recipients"]}
    assert by["ok@example.org"]["status"] == "sent"
    assert by["inconnu@example.org"]["status"] == "failed"
    assert by["inconnu@example.org"]["code"] == 550
    assert "No such user here" in by["inconnu@example.org"]["reply"]
    assert m["attempts"] == 1 and len(m["history"]) == 1
    assert m["history"][0]["relay"] == f"{relay.host}:{relay.port}"
    assert m["last_error"]["code"] == "recipient_refused"
    assert m["next_attempt_at"] is None


def test_relay_down_nothing_lost_and_no_waiting(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay)
    relay.down()
    ids = []
    with server.client("alice") as c:
        for i in range(20):
            t0 = time.monotonic()
            r = c.post("/api/v1/messages", json={**MSG, "to": [f"p{i}@example.org"]})
            assert r.status_code == 202
            assert time.monotonic() - t0 < 1.0, "acceptance must not wait for the relay"
            ids.append(r.json()["id"])
        m = server.wait_status(ids[0], "deferred")
        assert m["last_error"]["code"] == "refused"
        assert m["next_attempt_at"] is not None
    relay.up()
    relay.wait_for(20, timeout=20)
    for mid in ids:
        server.wait_status(mid, "sent")
    assert sorted(r for m in relay.messages for r in m.rcpt_tos) == sorted(
        f"p{i}@example.org" for i in range(20)
    )


def test_kill_9_after_acceptance_then_restart_delivers(
    server_process: ServerProcess, relay: FaultRelay
) -> None:
    server = server_process
    server.configure_relay(relay)
    relay.down()
    with server.client("alice") as c:
        ids = [c.post("/api/v1/messages", json={**MSG, "to": [f"k{i}@example.org"]}).json()["id"]
               for i in range(10)]
    server.kill()
    relay.up()
    server.start()
    relay.wait_for(10, timeout=20)
    for mid in ids:
        server.wait_status(mid, "sent")
    assert len(relay.messages) == 10


def test_sigterm_stops_cleanly(server_process: ServerProcess) -> None:
    server = server_process
    t0 = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - t0 < 10
    assert "stopped cleanly" in server.log()


def test_authorisation(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay)
    assert httpx.post(server.url + "/api/v1/messages", json=MSG).status_code == 401
    bad = httpx.get(server.url + "/api/v1/messages", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthenticated"
    with server.client("alice") as alice, server.client("bob") as bob, server.client() as admin:
        assert alice.get("/api/v1/settings").status_code == 403
        assert alice.put("/api/v1/settings", json={"delegation": False}).status_code == 403
        mid = alice.post("/api/v1/messages", json=MSG).json()["id"]
        # Another user's message does not exist for bob; the administrator sees it.
        assert bob.get(f"/api/v1/messages/{mid}").status_code == 404
        assert bob.post(f"/api/v1/messages/{mid}/cancel").status_code == 404
        assert bob.get("/api/v1/messages").json() == []
        assert admin.get(f"/api/v1/messages/{mid}").status_code == 200
        assert [m["id"] for m in alice.get("/api/v1/messages").json()] == [mid]
        assert mid in [m["id"] for m in admin.get("/api/v1/messages").json()]


def test_settings_password_is_write_only_and_encrypted(
    server: PostierServer, relay: FaultRelay
) -> None:
    secret = "Tr3s-S3cret-Password"
    out = server.configure_relay(
        relay, relay={"host": relay.host, "port": relay.port, "security": "none",
                      "auth": "password", "username": "college", "password": secret,
                      "timeout": 5}
    )
    assert "password" not in out["relay"] and out["relay"]["password_set"] is True
    with server.client() as c:
        got = c.get("/api/v1/settings").json()
        assert secret not in str(got) and got["relay"]["password_set"] is True
        # What GET shows can be PUT back; changing another part keeps the password.
        r = c.put("/api/v1/settings", json={"relay": {**got["relay"], "timeout": 9}})
        assert r.status_code == 200, r.text
        assert r.json()["relay"]["timeout"] == 9 and r.json()["relay"]["password_set"] is True
        # A partial change leaves the rest as it was.
        r = c.put("/api/v1/settings", json={"sender": {"name": "Lycée du Parc"}})
        assert r.status_code == 200
        assert r.json()["sender"] == {"name": "Lycée du Parc",
                                      "address": "ne-pas-repondre@ac-lyon.fr",
                                      "display": "establishment"}
        assert r.json()["relay"]["password_set"] is True
    db = (server.data_dir / "postier.db").read_bytes()
    wal = server.data_dir / "postier.db-wal"
    assert secret.encode() not in db + (wal.read_bytes() if wal.exists() else b"")
    key = server.data_dir / "secret.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_settings_validation_names_the_field(server: PostierServer) -> None:
    with server.client(**{"Accept-Language": "en"}) as c:
        before = c.get("/api/v1/settings").json()
        for body, field in [
            ({"relay": {"host": "smtp.ac-lyon.fr", "port": 70000}}, "relay.port"),
            ({"relay": {"host": "smtp.ac-lyon.fr", "security": "ssl"}}, "relay.security"),
            ({"relay": {"host": "smtp.ac-lyon.fr", "timeout": 0}}, "relay.timeout"),
            ({"allowed_domains": ["ac-lyon.fr", "https://ac-lyon.fr"]}, "allowed_domains.1"),
            ({"sender": {"address": "pas-une-adresse"}}, "sender.address"),
        ]:
            r = c.put("/api/v1/settings", json={**body, "delegation": False})
            assert r.status_code == 422, (body, r.text)
            assert r.json()["error"]["field"] == field, r.json()
        assert c.get("/api/v1/settings").json() == before, "nothing half-saved"


def test_delegation_off_refuses_with_explanation(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay, delegation=False)
    with server.client("alice", **{"Accept-Language": "fr"}) as c:
        r = c.post("/api/v1/messages", json=MSG)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "delegation_off"
    assert r.json()["error"]["hint"]


def test_idempotency_key(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay)
    body = {**MSG, "idempotency_key": "convocation-2026-42"}
    with server.client("alice") as alice, server.client("bob") as bob:
        a = alice.post("/api/v1/messages", json=body).json()
        b = alice.post("/api/v1/messages", json=body).json()
        assert a["id"] == b["id"] and b["duplicate"] is True
        # The key is per user: bob's identical key is his own message.
        c = bob.post("/api/v1/messages", json=body).json()
        assert c["id"] != a["id"]
    relay.wait_for(2)
    time.sleep(0.5)
    assert len(relay.messages) == 2


def test_cancel_and_retry(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay)
    relay.down()
    with server.client("alice") as c:
        a = c.post("/api/v1/messages", json=MSG).json()["id"]
        b = c.post("/api/v1/messages", json=MSG).json()["id"]
        server.wait_status(a, "deferred", user="alice")
        r = c.post(f"/api/v1/messages/{a}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        server.wait_status(b, "deferred", user="alice")
        relay.up()
        r = c.post(f"/api/v1/messages/{b}/retry")
        assert r.status_code == 200
        server.wait_status(b, "sent", user="alice", timeout=5)
        r = c.post(f"/api/v1/messages/{b}/cancel")
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        assert c.get(f"/api/v1/messages/{a}").json()["status"] == "cancelled"
    assert len(relay.messages) == 1


def test_cli_creates_users_and_tokens_while_server_runs(
    server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay)
    env = {**os.environ, "POSTIER_DATA_DIR": str(server.data_dir)}
    cli = [sys.executable, "-m", "postier"]
    r = subprocess.run(
        [*cli, "users", "add", "claire", "--email", "claire.petit@ac-lyon.fr",
         "--name", "Claire Petit", "--password-stdin"],
        input="un-mot-de-passe\n", capture_output=True, text=True, env=env, timeout=30,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cli, "tokens", "create", "claire"], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip().splitlines()[-1]
    resp = httpx.post(server.url + "/api/v1/messages", json=MSG,
                      headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 202, resp.text
    (got,) = relay.wait_for(1)
    assert got.mail_from == "claire.petit@ac-lyon.fr"
    r = subprocess.run(
        [*cli, "users", "add", "claire", "--email", "c@ac-lyon.fr"],
        capture_output=True, text=True, env={**env, "LANG": "fr_FR.UTF-8"}, timeout=30,
    )
    assert r.returncode == 1 and "claire" in r.stderr


def test_wrong_secret_key_is_reported_at_start_up(
    server_process: ServerProcess, relay: FaultRelay
) -> None:
    server = server_process
    server.configure_relay(relay, relay={"host": relay.host, "port": relay.port,
                                         "security": "none", "auth": "password",
                                         "username": "u", "password": "p", "timeout": 5})
    server.stop()
    from cryptography.fernet import Fernet

    server.env["POSTIER_SECRET_KEY"] = Fernet.generate_key().decode()
    try:
        server.start()  # it exits at once; the default bound leaves room on a busy machine
    except AssertionError as exc:
        message = str(exc)
    else:
        raise AssertionError("the server started with the wrong key")
    assert "secret key" in message.lower() and "encrypted with another" in message
    assert "Traceback" not in message


def test_data_is_private_to_its_owner(server: PostierServer) -> None:
    assert stat.S_IMODE(os.stat(server.data_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(server.data_dir / "postier.db").st_mode) == 0o600


def test_sender_is_told_when_an_e_mail_fails_for_good(
    server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay)
    relay.rcpt_replies = {"inconnu@example.org": "550 5.1.1 No such user here"}
    with server.client("alice") as c:
        mid = c.post("/api/v1/messages", json={**MSG, "to": ["inconnu@example.org",
                                                             "ok@example.org"]}).json()["id"]
    got = relay.wait_for(2)
    notice = next(m for m in got if m.message["X-Postier-Notice"] == "failure")
    assert notice.rcpt_tos == ["alice.martin@ac-lyon.fr"]
    assert notice.mail_from == "ne-pas-repondre@ac-lyon.fr"
    body = notice.message.get_body(("plain",)).get_content()
    assert "inconnu@example.org" in body and "No such user here" in body
    assert "Changement d'emploi du temps" in body and "-- English --" in body
    assert notice.message["X-Postier-Message"] == mid
    time.sleep(1.0)
    assert len(relay.messages) == 2, "one notice, and none about the notice"


def test_sender_is_warned_once_when_an_e_mail_is_delayed(
    server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay, retry={"first_delay": 1, "max_delay": 1, "max_age": 3600,
                                         "delay_warning": 1})
    relay.rcpt_replies = {"plein@example.org": "452 4.2.2 Mailbox full"}
    with server.client("alice") as c:
        mid = c.post("/api/v1/messages", json={**MSG, "to": ["plein@example.org"]}).json()["id"]
    (notice,) = relay.wait_for(1, timeout=15)
    assert notice.message["X-Postier-Notice"] == "delay"
    assert notice.rcpt_tos == ["alice.martin@ac-lyon.fr"]
    body = notice.message.get_body(("plain",)).get_content()
    assert "plein@example.org" in body and "Mailbox full" in body and "Nothing is lost" in body
    time.sleep(3.5)  # several more attempts: still one warning
    assert len(relay.messages) == 1
    relay.rcpt_replies = {}
    server.wait_status(mid, "sent", user="alice", timeout=10)
