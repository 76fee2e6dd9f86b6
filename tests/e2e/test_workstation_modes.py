"""A teacher's workstation in each of the three modes, with the real CLI, a real server
and a real relay."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from postier.client import Client
from postier.errors import Forbidden, InvalidInput

from support.relay import FaultRelay
from support.server import ServerProcess


class Workstation:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.config = home / "workstation.toml"
        self.env = {**os.environ, "POSTIER_CONFIG": str(self.config),
                    "POSTIER_OUTBOX": str(home / "outbox"), "LANG": "C", "COLUMNS": "200"}
        for var in ("LANGUAGE", "LC_ALL", "POSTIER_DATA_DIR"):
            self.env.pop(var, None)

    def run(self, *args: str, lang: str = "C") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "postier", *args], capture_output=True,
                              text=True, env={**self.env, "LANG": lang}, timeout=60)

    def set(self, **values: str | int) -> None:
        for key, value in values.items():
            r = self.run("config", "set", key.replace("__", "."), str(value))
            assert r.returncode == 0, r.stderr

    def own(self, relay: FaultRelay) -> None:
        self.set(mode="own", identity__name="Alice Martin",
                 identity__address="alice.martin@ac-lyon.fr", smtp__host=relay.host,
                 smtp__port=relay.port, smtp__security="none", smtp__timeout=2)


@pytest.fixture
def ws(tmp_path: Path) -> Workstation:
    return Workstation(tmp_path / "poste")


def test_server_mode_hands_the_e_mail_to_the_server(
    ws: Workstation, server: ServerProcess, relay: FaultRelay
) -> None:
    server.configure_relay(relay)
    ws.set(mode="server", server__url=server.url, server__token=server.tokens["alice"])
    t0 = time.monotonic()
    r = ws.run("send", "--to", "parent@example.org", "--subject", "Réunion",
               "--text", "Réunion parents-professeurs jeudi.")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 10
    message_id = r.stdout.split()[-1]
    assert r.stdout.startswith("queued")
    (got,) = relay.wait_for(1)
    assert got.mail_from == "alice.martin@ac-lyon.fr"
    server.wait_status(message_id, "sent", user="alice")
    st = ws.run("status", message_id)
    assert st.returncode == 0 and '"sent"' in st.stdout


def test_own_mode_sends_directly(ws: Workstation, relay: FaultRelay, tmp_path: Path) -> None:
    ws.own(relay)
    doc = tmp_path / "convocation.pdf"
    doc.write_bytes(b"%PDF-1.4 convocation")
    r = ws.run("send", "--to", "parent@example.org", "--subject", "Convocation",
               "--text", "Voir la pièce jointe.", "--attach", str(doc))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sent")
    (got,) = relay.wait_for(1)
    assert got.mail_from == "alice.martin@ac-lyon.fr"
    assert got.message["From"] == "Alice Martin <alice.martin@ac-lyon.fr>"
    parts = [p for p in got.message.iter_attachments()]
    assert parts[0].get_filename() == "convocation.pdf"
    assert parts[0].get_content() == b"%PDF-1.4 convocation"
    # The file holds a password one day: it is private to its owner.
    assert stat.S_IMODE(os.stat(ws.config).st_mode) == 0o600


def test_relay_down_keeps_the_e_mail_then_flush_sends_it_once(
    ws: Workstation, relay: FaultRelay
) -> None:
    ws.own(relay)
    relay.down()
    r = ws.run("send", "--to", "parent@example.org", "--subject", "Sortie",
               "--text", "Sortie scolaire", lang="fr_FR.UTF-8")
    assert r.returncode == 75, r.stdout + r.stderr
    assert "connexion refusée" in r.stderr.lower()
    assert "outbox flush" in r.stderr
    listing = ws.run("outbox", "list")
    assert "deferred" in listing.stdout and "Sortie" in listing.stdout
    relay.up()
    r = ws.run("outbox", "flush")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sent")
    relay.wait_for(1)
    assert ws.run("outbox", "flush").stdout.startswith("The outbox is empty")
    time.sleep(0.3)
    assert len(relay.messages) == 1, "nothing sent twice"


def test_profile_pulled_from_the_server_configures_the_workstation(
    ws: Workstation, server: ServerProcess, relay: FaultRelay
) -> None:
    with server.client() as admin:
        r = admin.post("/api/v1/profiles", json={
            "label": "Relais du collège", "host": relay.host, "port": relay.port,
            "security": "none", "auth": "none", "timeout": 5})
        assert r.status_code == 201
    ws.set(mode="server", server__url=server.url, server__token=server.tokens["bob"],
           identity__name="Bob Durand", identity__address="bob.durand@gmail.com")
    listing = ws.run("profiles", "list")
    assert listing.returncode == 0 and "Relais du collège" in listing.stdout, listing.stderr
    r = ws.run("profiles", "pull", "Relais du collège")
    assert r.returncode == 0, r.stderr
    shown = ws.run("config", "show").stdout
    assert '"mode": "profile"' in shown and str(relay.port) in shown
    r = ws.run("send", "--to", "parent@example.org", "--subject", "Via le profil",
               "--text", "Bonjour")
    assert r.returncode == 0, r.stderr
    (got,) = relay.wait_for(1)
    assert got.mail_from == "bob.durand@gmail.com"
    r = ws.run("profiles", "pull", "Inconnu")
    assert r.returncode == 1 and "Relais du collège" in r.stderr


def test_bad_settings_and_unreachable_server_are_explained(
    ws: Workstation, closed_port: int
) -> None:
    r = ws.run("config", "set", "mode", "partout")
    assert r.returncode == 1 and "mode" in r.stderr and "server" in r.stderr
    r = ws.run("config", "set", "smtp.port", "99999")
    assert r.returncode == 1 and "smtp.port" in r.stderr and "65535" in r.stderr
    r = ws.run("config", "set", "smtp.hots", "x")
    assert r.returncode == 1 and "smtp.host" in r.stderr
    r = ws.run("config", "set", "identity.address", "pas une adresse")
    assert r.returncode == 1 and "identity.address" in r.stderr
    r = ws.run("send", "--to", "p@example.org", "--text", "x")
    assert r.returncode == 1 and "server.url" in r.stderr
    ws.set(server__url=f"http://127.0.0.1:{closed_port}", server__token="pst_x")
    r = ws.run("send", "--to", "p@example.org", "--text", "x")
    assert r.returncode == 1 and "cannot be reached" in r.stderr
    shown = ws.run("config", "show").stdout
    assert "pst_x" not in shown, "the token is masked"


def test_workstation_test_send_explains_timeouts_in_french(
    ws: Workstation, relay: FaultRelay, blackhole: int
) -> None:
    ws.own(relay)
    r = ws.run("test", "--to", "verif@example.org")
    assert r.returncode == 0, r.stderr
    assert "rcpt_to" in r.stdout
    relay.wait_for(1)
    ws.set(smtp__port=blackhole)
    r = ws.run("test", "--to", "verif@example.org", lang="fr_FR.UTF-8")
    assert r.returncode == 1
    assert "Délai dépassé" in r.stderr and "augmentez le délai d'attente" in r.stderr.lower()


def test_sdk_against_the_real_server(server: ServerProcess, relay: FaultRelay) -> None:
    server.configure_relay(relay)
    with Client(server.url, server.tokens["alice"], lang="fr") as c:
        sub = c.submit(["parent@example.org"], "Bulletin", "Le bulletin est en ligne.",
                       idempotency_key="bulletin-t1")
        assert sub.status == "queued"
        assert c.submit(["parent@example.org"], "Bulletin", "x",
                        idempotency_key="bulletin-t1").duplicate is True
        relay.wait_for(1)
        deadline = time.monotonic() + 10
        while c.status(sub.id).status != "sent" and time.monotonic() < deadline:
            time.sleep(0.1)
        st = c.status(sub.id)
        assert st.status == "sent" and st.recipients[0].status == "sent"
        with pytest.raises(InvalidInput) as bad:
            c.submit(["pas une adresse"], "x", "y")
        assert bad.value.field == "to.0"
        with pytest.raises(Forbidden) as forbidden:
            c.test_settings("x@example.org")
        assert "administrateur" in forbidden.value.message()
    assert httpx.get(server.url + "/api/v1/health").status_code == 200
