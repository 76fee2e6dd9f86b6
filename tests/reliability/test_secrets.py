"""Secrets on the real server: the relay password, a profile's shared password, API
tokens, users' passwords and DKIM private keys appear in no API answer (but the one meant
to give it), no log line, no audit entry, and nowhere in clear in the database files —
after they were really used: a delivery through an authenticating relay, a test-send, SMTP
submission with a password and with a token. And the key file's permissions are checked
when the server starts."""

from __future__ import annotations

import base64
import os
import smtplib
import ssl
from pathlib import Path
from typing import Any

from reliability_kit import wait_until

from support.relay import FaultRelay
from support.server import ServerProcess

RELAY_SECRET = "Relais-Secret-7f3a9c"
PROFILE_SECRET = "Profil-Secret-2b8e1d"
NEW_PASSWORD = "Nouveau-Mdp-5c4d3e"
WEBHOOK_SECRET = "Webhook-Secret-8d2f6a1b"


def _files(data_dir: Path) -> bytes:
    out = b""
    for name in ("postier.db", "postier.db-wal", "postier.db-shm"):
        path = data_dir / name
        if path.exists():
            out += path.read_bytes()
    return out


def test_secrets_never_shown_logged_or_stored_in_clear(
    server_factory: Any, relay_cert: tuple[Path, Path]
) -> None:
    with FaultRelay(auth={"college": RELAY_SECRET}, cert=relay_cert) as relay:
        server: ServerProcess = server_factory().start()
        server.configure_relay(relay, relay={
            "host": relay.host, "port": relay.port, "security": "none", "auth": "password",
            "username": "college", "password": RELAY_SECRET, "timeout": 5})
        answers: list[str] = []
        with server.client() as admin, server.client("alice") as alice:
            def keep(r: Any) -> Any:
                answers.append(r.text)
                return r

            keep(admin.post("/api/v1/profiles", json={
                "label": "Académie", "host": "smtp.ac-lyon.fr", "auth": "password",
                "username": "partage", "password": PROFILE_SECRET}))
            created = admin.post("/api/v1/tokens", json={"name": "appli", "user": "alice"})
            token = created.json()["token"]  # shown once, on creation: not kept in answers
            keep(admin.post("/api/v1/dkim", json={"domain": "ac-lyon.fr"}))
            keep(admin.post("/api/v1/settings/test", json={"to": "p@example.org"}))
            keep(admin.put("/api/v1/users/bob", json={"password": NEW_PASSWORD}))
            keep(admin.put("/api/v1/settings", json={"alerts": {
                "webhook_url": "https://ent.example.org/hook", "webhook_secret": WEBHOOK_SECRET}}))
            mid = keep(alice.post("/api/v1/messages", json={
                "to": ["p@example.org"], "subject": "s"})).json()["id"]
            server.wait_status(mid, "sent")
            ctx = ssl.create_default_context(cafile=str(server.data_dir / "smtp-cert.pem"))
            for password in ("motdepasse-alice", token):
                with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as c:
                    c.starttls(context=ctx)
                    c.login("alice", password)
                    c.sendmail("alice.martin@ac-lyon.fr", ["p@example.org"],
                               "Subject: smtp\r\n\r\nx\r\n")
            try:  # a bad guess is logged, never its value
                with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as c:
                    c.starttls(context=ctx)
                    c.login("alice", "Essai-Faux-9a8b")
            except smtplib.SMTPAuthenticationError:
                pass
            pid = admin.get("/api/v1/profiles").json()[0]["id"]
            for client, path in [
                (admin, "/api/v1/settings"), (admin, "/api/v1/profiles"),
                (admin, f"/api/v1/profiles/{pid}"), (alice, "/api/v1/profiles"),
                (admin, "/api/v1/users"), (admin, "/api/v1/tokens?username=alice"),
                (alice, "/api/v1/tokens"), (admin, "/api/v1/audit?limit=1000"),
                (admin, "/api/v1/me"), (alice, "/api/v1/me/data"),
                (admin, "/api/v1/users/alice/data"), (admin, "/api/v1/messages"),
                (admin, f"/api/v1/messages/{mid}"), (admin, "/api/v1/dkim"),
                (admin, "/api/v1/relay-presets"), (admin, "/metrics"),
                (admin, "/api/v1/ready"), (admin, "/openapi.json"), (admin, "/api/v1/alerts"),
            ]:
                keep(client.get(path))
            # Retrieval is the one door meant to give a profile's password.
            retrieved = alice.post(f"/api/v1/profiles/{pid}/retrieve").json()
            assert retrieved["password"] == PROFILE_SECRET
        wait_until(lambda: len(relay.messages) >= 3, timeout=15, what="deliveries")
        assert {m.auth_user for m in relay.messages} == {"college"}, "the password was used"
        server.stop()

    secrets = {
        "relay password": RELAY_SECRET, "profile password": PROFILE_SECRET,
        "API token": token, "alice's password": "motdepasse-alice",
        "bob's new password": NEW_PASSWORD, "a wrong guess": "Essai-Faux-9a8b",
        "DKIM private key": "PRIVATE KEY", "webhook secret": WEBHOOK_SECRET,
        "relay AUTH PLAIN": base64.b64encode(f"\0college\0{RELAY_SECRET}".encode()).decode(),
        "relay password, base64": base64.b64encode(RELAY_SECRET.encode()).decode(),
    }
    places = {
        "API answers": "\n".join(answers),
        "server.log": server.log(),
        "database files": _files(server.data_dir).decode("latin-1"),
    }
    found = [f"{what} in {where}" for what, secret in secrets.items()
             for where, text in places.items() if secret in text]
    assert not found, found


def test_a_key_file_readable_by_others_is_reported_at_start_up(
    server_factory: Any, tmp_path: Path
) -> None:
    server: ServerProcess = server_factory()
    key = server.data_dir / "secret.key"
    assert key.exists()
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    server.start()
    assert "secret key file" not in server.log()
    server.stop()
    key.chmod(0o644)
    server.start()
    server.stop()
    assert "readable by other users" in server.log() and "chmod 600" in server.log()
    # The same for a key kept elsewhere (POSTIER_SECRET_KEY_FILE).
    elsewhere = tmp_path / "shared.key"
    elsewhere.write_bytes(key.read_bytes())
    elsewhere.chmod(0o640)
    server.env["POSTIER_SECRET_KEY_FILE"] = str(elsewhere)
    server.log_path.unlink()
    server.start()
    server.stop()
    assert f"{elsewhere} is readable by other users" in server.log()
    assert os.stat(server.data_dir).st_mode & 0o077 == 0, "the data directory stays private"
