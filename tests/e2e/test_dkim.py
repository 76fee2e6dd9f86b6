"""DKIM: the administrator makes a key, publishes the record, and every e-mail from that
domain leaves signed — checked here the way a receiving server checks it."""

from __future__ import annotations

import os
import subprocess
import sys

import dkim
import pytest

from support.relay import FaultRelay
from support.server import PostierServer

pytestmark = pytest.mark.in_process


def _verifies(data: bytes, record_name: str, record_value: str) -> bool:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return record_value.encode() if name.decode().rstrip(".") == record_name else b""

    return bool(dkim.verify(data, dnsfunc=dnsfunc))


def test_e_mails_from_a_domain_with_a_key_are_signed(
    server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay)
    with server.client() as admin:
        r = admin.post("/api/v1/dkim", json={"domain": "ac-lyon.fr", "selector": "ecole2026"})
        assert r.status_code == 201, r.text
        key = r.json()
        assert key["record_name"] == "ecole2026._domainkey.ac-lyon.fr"
        assert key["record_value"].startswith("v=DKIM1; k=rsa; p=")
        assert "PRIVATE" not in admin.get("/api/v1/dkim").text
        # Never for a domain the policy does not send from.
        bad = admin.post("/api/v1/dkim", json={"domain": "gmail.com"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "domain"
        # The test-send signs and checks the signature against the record to publish.
        report = admin.post("/api/v1/settings/test", json={"to": "verif@example.org"}).json()
        assert report["ok"] and report["dkim"]["verified"] is True
    with server.client("alice") as alice:
        alice.post("/api/v1/messages", json={"to": ["p@example.org"], "subject": "Signé",
                                             "text": "Bonjour"})
    with server.client("bob") as bob:  # outside the domain: the establishment's sender
        bob.post("/api/v1/messages", json={"to": ["p@example.org"], "subject": "Aussi",
                                           "text": "Bonjour"})
    got = relay.wait_for(3)
    for m in got:
        assert m.message["DKIM-Signature"] is not None, m.message["Subject"]
        assert _verifies(m.data, key["record_name"], key["record_value"])
    # Tampering breaks it, as it should.
    tampered = got[1].data.replace(b"Bonjour", b"Bonsoir")
    assert not _verifies(tampered, key["record_name"], key["record_value"])


def test_dkim_generate_from_the_console(server: PostierServer, relay: FaultRelay) -> None:
    server.configure_relay(relay)
    env = {**os.environ, "POSTIER_DATA_DIR": str(server.data_dir), "COLUMNS": "300"}
    r = subprocess.run([sys.executable, "-m", "postier", "dkim", "generate", "ac-lyon.fr"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('postier._domainkey.ac-lyon.fr. IN TXT "v=DKIM1; k=rsa; p=')
    listing = subprocess.run([sys.executable, "-m", "postier", "dkim", "list"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert "postier._domainkey.ac-lyon.fr" in listing.stdout

    # Removed from the console: no longer listed, and the API agrees.
    removed = subprocess.run([sys.executable, "-m", "postier", "dkim", "remove", "AC-Lyon.fr"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert removed.returncode == 0, removed.stderr
    assert "ac-lyon.fr are no longer signed" in removed.stderr
    listing = subprocess.run([sys.executable, "-m", "postier", "dkim", "list"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert listing.returncode == 0 and "ac-lyon.fr" not in listing.stdout
    with server.client("admin") as admin:
        assert admin.get("/api/v1/dkim").json() == []
    again = subprocess.run([sys.executable, "-m", "postier", "dkim", "remove", "ac-lyon.fr"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode != 0
    assert "There is no DKIM key for ac-lyon.fr" in again.stderr


def test_a_key_for_an_internationalised_domain_is_removed_by_either_spelling(
    server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay, allowed_domains=["ac-lyon.fr", "école-exemple.fr"])
    with server.client() as admin:
        for given, removed_as in (("École-Exemple.fr", "xn--cole-exemple-9db.fr"),
                                  ("xn--cole-exemple-9db.fr", "ÉCOLE-exemple.FR")):
            r = admin.post("/api/v1/dkim", json={"domain": given})
            assert r.status_code == 201, r.text
            assert [k["domain"] for k in admin.get("/api/v1/dkim").json()] == [
                "école-exemple.fr"]
            assert admin.delete(f"/api/v1/dkim/{removed_as}").status_code == 204
            assert admin.get("/api/v1/dkim").json() == []
        missing = admin.delete("/api/v1/dkim/xn--cole-exemple-9db.fr")
        assert missing.status_code == 404
        assert "école-exemple.fr" in missing.json()["error"]["message"]
