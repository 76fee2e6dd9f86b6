"""Administration through the real server: test-send, profiles, preview, users, audit."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from support.relay import FaultRelay
from support.server import PostierServer

pytestmark = pytest.mark.in_process

FR = {"Accept-Language": "fr-FR,fr;q=0.9"}


def _relay(r: FaultRelay, **kw: Any) -> dict[str, Any]:
    return {"host": r.host, "port": r.port, "security": "none", "auth": "none",
            "timeout": 5, **kw}


# -- test-send -------------------------------------------------------------------------------


def test_test_send_with_saved_settings_delivers_a_real_e_mail(
    server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay)
    with server.client(**FR) as c:
        r = c.post("/api/v1/settings/test", json={"to": "verif@example.org"})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["ok"] is True and report["error"] is None
    steps = [s["step"] for s in report["steps"]]
    assert steps == ["resolve", "connect", "greeting", "ehlo", "mail_from", "rcpt_to", "data"]
    assert all(isinstance(s["ms"], int) for s in report["steps"])
    assert "250" in report["steps"][-1]["detail"]
    (got,) = relay.wait_for(1)
    assert got.rcpt_tos == ["verif@example.org"]
    assert got.mail_from == "direction@ac-lyon.fr"  # the admin is inside ac-lyon.fr
    assert "Test" in got.message["Subject"]
    assert str(relay.port) in got.message.get_body(("plain",)).get_content()


def test_test_send_unsaved_timeout_explained_in_french(
    server: PostierServer, relay: FaultRelay, blackhole: int
) -> None:
    server.configure_relay(relay)
    t0 = time.monotonic()
    with server.client(**FR) as c:
        before = c.get("/api/v1/settings").json()
        r = c.post("/api/v1/settings/test", json={
            "to": "verif@example.org",
            "settings": {"relay": {"host": "127.0.0.1", "port": blackhole, "timeout": 2}},
        })
        after = c.get("/api/v1/settings").json()
    assert time.monotonic() - t0 < 9, "a test never hangs"
    report = r.json()
    assert report["ok"] is False
    assert report["error"]["code"] == "timeout"
    assert "Délai dépassé" in report["error"]["message"]
    assert "augmentez le délai d'attente du serveur" in report["error"]["hint"].lower()
    assert "2 s" in report["error"]["hint"]
    assert report["steps"][-1]["ok"] is False
    assert before == after, "testing unsaved settings saves nothing"


def test_test_send_refused_port_and_english(
    server: PostierServer, relay: FaultRelay, closed_port: int
) -> None:
    server.configure_relay(relay)
    with server.client(**{"Accept-Language": "en"}) as c:
        r = c.post("/api/v1/settings/test", json={
            "to": "verif@example.org",
            "settings": {"relay": {"port": closed_port}},
        })
    err = r.json()["error"]
    assert err["code"] == "refused"
    assert "connection refused" in err["message"]


def test_test_send_checks_sender_identities(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay)
    relay.refuse_senders = {"ne-pas-repondre@ac-lyon.fr"}
    with server.client() as c:
        r = c.post("/api/v1/settings/test",
                   json={"to": "verif@example.org", "check_senders": True})
    checks = {x["address"]: x for x in r.json()["sender_checks"]}
    assert checks["ne-pas-repondre@ac-lyon.fr"]["ok"] is False
    assert checks["ne-pas-repondre@ac-lyon.fr"]["code"] == 553
    assert any(a.endswith("@ac-lyon.fr") and x["ok"] for a, x in checks.items())


def test_test_send_is_for_administrators(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay)
    with server.client("alice") as c:
        assert c.post("/api/v1/settings/test", json={"to": "x@example.org"}).status_code == 403


# -- sending profiles ------------------------------------------------------------------------


def test_profiles_created_by_admin_retrieved_by_user(server: PostierServer) -> None:
    secret = "Mot-De-Passe-Partage"
    profile = {"label": "Messagerie académique", "host": "smtp.ac-lyon.fr", "port": 587,
               "security": "starttls", "auth": "password", "username": "", "password": secret,
               "timeout": 30}
    with server.client() as admin, server.client("alice") as alice:
        r = admin.post("/api/v1/profiles", json=profile)
        assert r.status_code == 201, r.text
        pid = r.json()["id"]
        assert secret not in r.text and r.json()["password_set"] is True
        # A duplicate label is refused with a message naming the field.
        dup = admin.post("/api/v1/profiles", json={**profile, "label": "Messagerie académique"})
        assert dup.status_code == 422 and dup.json()["error"]["field"] == "label"
        # Users list and read, never the secret; they cannot change anything.
        listing = alice.get("/api/v1/profiles")
        assert listing.status_code == 200 and secret not in listing.text
        assert [p["label"] for p in listing.json()] == ["Messagerie académique"]
        assert alice.put(f"/api/v1/profiles/{pid}", json=profile).status_code == 403
        assert alice.delete(f"/api/v1/profiles/{pid}").status_code == 403
        assert alice.post("/api/v1/profiles", json={**profile, "label": "x"}).status_code == 403
        # Retrieval gives the workstation what it needs, and is recorded.
        got = alice.post(f"/api/v1/profiles/{pid}/retrieve").json()
        assert got["host"] == "smtp.ac-lyon.fr" and got["password"] == secret
        # Editing without a password keeps it; the audit log says who did what.
        r = admin.put(f"/api/v1/profiles/{pid}", json={**profile, "password": None,
                                                        "port": 465, "security": "tls"})
        assert r.status_code == 200 and r.json()["port"] == 465
        assert r.json()["password_set"] is True
        log = admin.get("/api/v1/audit").json()
        actions = [(e["actor"], e["action"]) for e in log]
        assert ("alice", "profile.retrieve") in actions
        assert ("admin", "profile.create") in actions
        upd = next(e for e in log if e["action"] == "profile.update")
        assert sorted(upd["details"]["changed"]) == ["port", "security"]
        assert secret not in str(log)
        assert admin.delete(f"/api/v1/profiles/{pid}").status_code == 204
        assert alice.get(f"/api/v1/profiles/{pid}").status_code == 404


def test_profile_validation(server: PostierServer) -> None:
    with server.client(**FR) as admin:
        for body, field in [
            ({"label": "", "host": "smtp.x.fr"}, "label"),
            ({"label": "A", "host": "smtp.x.fr", "port": 0}, "port"),
            ({"label": "A", "host": "smtp.x.fr", "security": "ssl"}, "security"),
            ({"label": "A", "host": "smtp.x.fr", "auth": "kerberos"}, "auth"),
            ({"label": "A", "host": "smtp x.fr"}, "host"),
            ({"label": "A", "host": "smtp.x.fr", "timeout": 601}, "timeout"),
        ]:
            r = admin.post("/api/v1/profiles", json=body)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["error"]["field"] == field, r.json()
        assert admin.get("/api/v1/profiles").json() == []


# -- sender preview --------------------------------------------------------------------------


def test_sender_preview_explains_the_rule(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay, allowed_domains=["ac-lyon.fr", "*.ac-lyon.fr"])
    with server.client() as admin, server.client("bob") as bob, server.client("alice") as alice:
        p = admin.post("/api/v1/settings/preview", json={"user": "bob"}).json()
        assert p["envelope_from"] == "ne-pas-repondre@ac-lyon.fr"
        assert p["reply_to"] == ["bob.durand@gmail.com"]
        assert p["rule"] == "outside_allowed"
        assert "bob.durand@gmail.com" in p["explanation"]
        assert "ac-lyon.fr, *.ac-lyon.fr" in p["explanation"]
        own = bob.post("/api/v1/settings/preview", json={}).json()
        assert own == p
        assert bob.post("/api/v1/settings/preview", json={"user": "alice"}).status_code == 403
        a = alice.post("/api/v1/settings/preview", json={}, headers=FR).json()
        assert a["rule"] == "inside_allowed" and a["from"].endswith("<alice.martin@ac-lyon.fr>")
        assert "domaine autorisé" in a["explanation"]
    # Preview and reality agree: bob's e-mail leaves as the preview said.
    with server.client("bob") as bob:
        bob.post("/api/v1/messages", json={"to": ["x@example.org"], "text": "t"})
    (got,) = relay.wait_for(1)
    assert got.mail_from == p["envelope_from"]
    assert got.message["Reply-To"] == "bob.durand@gmail.com"


# -- users and tokens ------------------------------------------------------------------------


def test_users_managed_by_admin_and_disabled_tokens_stop_at_once(server: PostierServer) -> None:
    with server.client() as admin:
        r = admin.post("/api/v1/users", json={"username": "claire", "email":
                                              "claire@ac-lyon.fr", "name": "Claire",
                                              "password": "un-bon-mot-de-passe"})
        assert r.status_code == 201, r.text
        tok = admin.post("/api/v1/tokens", json={"user": "claire", "name": "poste"}).json()
        assert tok["token"].startswith("pst_")
        claire = httpx.Client(base_url=server.url,
                              headers={"Authorization": f"Bearer {tok['token']}"})
        assert claire.get("/api/v1/me").json()["username"] == "claire"
        assert claire.get("/api/v1/users").status_code == 403
        assert admin.post("/api/v1/users", json={"username": "claire", "email":
                                                  "c2@ac-lyon.fr"}).status_code == 409
        r = admin.delete("/api/v1/users/claire")
        assert r.status_code == 200 and r.json()["disabled"] is True
        assert claire.get("/api/v1/me").status_code == 401
        users = {u["username"]: u for u in admin.get("/api/v1/users").json()}
        assert users["claire"]["disabled"] is True
        # An administrator cannot lock themselves out.
        r = admin.put("/api/v1/users/admin", json={"role": "user"})
        assert r.status_code == 422
        actions = [e["action"] for e in admin.get("/api/v1/audit").json()]
        assert "user.create" in actions and "token.create" in actions


def test_user_changes_own_password_and_manages_own_tokens(server: PostierServer) -> None:
    with server.client("alice") as alice:
        r = alice.post("/api/v1/me/password", json={"current": "faux", "new": "nouveau-mdp-1"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "current"
        r = alice.post("/api/v1/me/password",
                       json={"current": "motdepasse-alice", "new": "nouveau-mdp-1"})
        assert r.status_code == 204
        new = alice.post("/api/v1/tokens", json={"name": "second"}).json()
        ids = [t["id"] for t in alice.get("/api/v1/tokens").json()]
        assert new["id"] in ids and len(ids) == 2
        assert alice.get("/api/v1/tokens", params={"username": "bob"}).status_code == 403
        assert alice.delete(f"/api/v1/tokens/{new['id']}").status_code == 204
        second = httpx.get(server.url + "/api/v1/me",
                           headers={"Authorization": f"Bearer {new['token']}"})
        assert second.status_code == 401


def test_settings_changes_are_audited_without_secrets(
    server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay, relay=_relay(relay, auth="password", username="u",
                                               password="Secret-123"))
    with server.client() as admin:
        entry = next(e for e in admin.get("/api/v1/audit").json()
                     if e["action"] == "settings.update")
        assert entry["actor"] == "admin"
        assert "relay.password" in entry["details"]["changed"]
        assert "Secret-123" not in admin.get("/api/v1/audit").text
    with server.client("alice") as alice:
        assert alice.get("/api/v1/audit").status_code == 403


def test_relay_presets_fill_the_settings(server: PostierServer) -> None:
    with server.client(**FR) as admin:
        presets = {p["id"]: p for p in admin.get("/api/v1/relay-presets").json()}
        m365 = presets["microsoft365"]
        assert m365["relay"]["host"] == "smtp.office365.com"
        assert m365["relay"]["max_per_minute"] == 30
        assert "30 messages par minute" in m365["limits"] and m365["source"].startswith("https")
        r = admin.put("/api/v1/settings", json={"relay": m365["relay"]})
        assert r.status_code == 200 and r.json()["relay"]["max_per_minute"] == 30


def test_oauth2_secrets_are_write_only_and_encrypted(server: PostierServer) -> None:
    secret, refresh = "Cl13nt-S3cret-XYZ", "R3fresh-T0ken-XYZ"
    with server.client() as admin:
        r = admin.put("/api/v1/settings", json={"relay": {
            "host": "smtp.office365.com", "port": 587, "security": "starttls",
            "auth": "oauth2", "username": "secretariat@ac-lyon.fr", "oauth2_tenant": "t",
            "oauth2_client_id": "app", "oauth2_client_secret": secret,
            "oauth2_refresh_token": refresh, "oauth2_secret_expires": "2020-01-01"}})
        assert r.status_code == 200, r.text
        doc = admin.get("/api/v1/settings").json()
        assert doc["relay"]["oauth2_client_secret_set"] and doc["relay"]["oauth2_refresh_token_set"]
        assert secret not in str(doc) and refresh not in str(doc)
        assert any("2020-01-01" in w for w in doc["warnings"]), "expiry is warned"
        audit = admin.get("/api/v1/audit").text
        assert "relay.oauth2_client_secret" in audit and secret not in audit
    raw = b"".join(p.read_bytes() for p in server.data_dir.glob("postier.db*"))
    assert secret.encode() not in raw and refresh.encode() not in raw


def test_backup_relay_can_be_tested(server: PostierServer, relay: FaultRelay) -> None:
    with FaultRelay() as backup:
        server.configure_relay(relay, backup_relay=_relay(backup), failover_after=60)
        with server.client() as admin:
            shown = admin.get("/api/v1/settings").json()
            assert shown["backup_relay"]["port"] == backup.port
            r = admin.post("/api/v1/settings/test",
                           json={"to": "verif@example.org", "relay": "backup"})
            assert r.json()["ok"] is True
        backup.wait_for(1)
        assert relay.messages == []
