"""A teacher's workstation in each of the three modes, with the real CLI, a real server
and a real relay."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import postier
from postier.errors import Forbidden, InvalidInput
from postier.workstation.client import Client, SendResult
from postier.workstation.sending import send
from postier.workstation.settings_file import WorkstationSettings

from support.proxy import AnswerDropper
from support.relay import FaultRelay
from support.server import PostierServer

pytestmark = pytest.mark.in_process


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

    def watch(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "postier", "outbox", "watch", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env)

    def own(self, relay: FaultRelay) -> None:
        self.set(mode="own", identity__name="Alice Martin",
                 identity__address="alice.martin@ac-lyon.fr", smtp__host=relay.host,
                 smtp__port=relay.port, smtp__security="none", smtp__timeout=2)


@pytest.fixture
def ws(tmp_path: Path) -> Workstation:
    return Workstation(tmp_path / "poste")


def test_server_mode_hands_the_e_mail_to_the_server(
    ws: Workstation, server: PostierServer, relay: FaultRelay
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
    st = ws.run("status", message_id, "--json")
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
    ws: Workstation, server: PostierServer, relay: FaultRelay
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
    said = " ".join(r.stderr.split())
    assert r.returncode == 75 and "cannot be reached: connection refused" in said
    assert "is kept in this workstation's outbox" in said
    shown = ws.run("config", "show").stdout
    assert "pst_x" not in shown, "the token is masked"


def test_workstation_test_send_explains_timeouts_in_french(
    ws: Workstation, relay: FaultRelay, blackhole: int
) -> None:
    ws.own(relay)
    r = ws.run("test", "--to", "verif@example.org")
    assert r.returncode == 0, r.stderr
    assert "recipient (RCPT TO)" in r.stdout
    relay.wait_for(1)
    ws.set(smtp__port=blackhole)
    r = ws.run("test", "--to", "verif@example.org", lang="fr_FR.UTF-8")
    assert r.returncode == 1
    assert "Délai dépassé" in r.stderr and "augmentez le délai d'attente" in r.stderr.lower()


def test_sdk_against_the_real_server(server: PostierServer, relay: FaultRelay) -> None:
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


# -- server mode: the server away ------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)
    return value


def kept_id(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 75, r.stdout + r.stderr
    found = re.match(r"(?:kept|gardé): (\w+)", r.stdout)
    assert found, r.stdout
    return found.group(1)


def server_copies(server: PostierServer, subject: str) -> list[dict[str, Any]]:
    """Alice's e-mails of that subject as the server holds them."""
    with server.client("alice") as c:
        return [m for m in c.get("/api/v1/messages", params={"limit": 500}).json()
                if m["subject"] == subject]


def test_server_away_keeps_the_e_mail_and_the_next_command_hands_it_over_once(
    ws: Workstation, server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay)
    ws.set(mode="server", server__url=server.url, server__token=server.tokens["alice"])
    server.stop()
    r = ws.run("send", "--to", "parent@example.org", "--subject", "Sortie au musée",
               "--text", "Départ 8 h.", lang="fr_FR.UTF-8")
    kept = kept_id(r)
    said = " ".join(r.stderr.split())  # as read, whatever the terminal's width
    assert "injoignable : connexion refusée" in said
    assert f"L'e-mail {kept} est gardé dans la boîte d'envoi" in said
    assert "postier outbox watch" in said
    listing = ws.run("outbox", "list")
    assert kept in listing.stdout and "Sortie au musée" in listing.stdout
    assert "deferred" in listing.stdout and "server" in listing.stdout

    server.start()
    r = ws.run("status", kept, "--json")  # any command hands the kept e-mails over first
    assert r.returncode == 0, r.stderr
    assert f"The e-mail {kept} kept in this workstation's outbox was handed" in \
        " ".join(r.stderr.split())
    (copy,) = server_copies(server, "Sortie au musée")
    assert json.loads(r.stdout)["id"] == copy["id"], "status follows it on the server"
    (got,) = relay.wait_for(1)
    assert got.message["Subject"] == "Sortie au musée"
    server.wait_status(copy["id"], "sent", user="alice")
    assert ws.run("outbox", "flush").stdout.startswith("The outbox is empty")
    assert "handed over" in ws.run("outbox", "list").stdout
    assert len(server_copies(server, "Sortie au musée")) == 1
    assert len(relay.messages) == 1


def test_an_answer_lost_after_the_server_stored_the_e_mail_never_makes_a_second_copy(
    ws: Workstation, server: PostierServer, relay: FaultRelay
) -> None:
    server.configure_relay(relay)
    with AnswerDropper(server.port) as proxy:
        ws.set(mode="server", server__url=proxy.url, server__token=server.tokens["alice"])
        r = ws.run("send", "--to", "parent@example.org", "--subject", "Conseil de classe",
                   "--text", "Mardi 17 h.")
        kept = kept_id(r)
        assert proxy.dropped == 1 and "closed before its answer" in " ".join(r.stderr.split())
        (first,) = server_copies(server, "Conseil de classe")  # the server did store it

        proxy.drop = False
        watcher = ws.watch("--interval", "0.2")
        try:
            wait_until(lambda: "handed over" in ws.run("outbox", "list").stdout,
                       "outbox watch hands the kept e-mail over")
        finally:
            watcher.send_signal(signal.SIGTERM)
            out, errors = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, errors
        # The server recognised its first copy (already sent by now, or still queued).
        assert re.search(rf"^(queued|sent): {first['id']}$", out, re.M), out
        assert kept in errors
    server.wait_status(first["id"], "sent", user="alice")
    assert len(server_copies(server, "Conseil de classe")) == 1
    assert len(relay.messages) == 1


def test_a_refusal_is_said_at_once_and_not_kept(
    ws: Workstation, server: PostierServer
) -> None:
    ws.set(mode="server", server__url=server.url, server__token=server.tokens["alice"])
    r = ws.run("send", "--to", "pas une adresse", "--subject", "Refusé", "--text", "x")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "kept" not in r.stdout + r.stderr
    assert "Refusé" not in ws.run("outbox", "list").stdout


def test_sdk_keeps_the_e_mail_and_the_background_flusher_hands_it_over(
    server: PostierServer, relay: FaultRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTIER_OUTBOX", str(tmp_path / "outbox"))
    server.configure_relay(relay)
    settings = WorkstationSettings()
    settings.set("server.url", server.url)
    settings.set("server.token", server.tokens["alice"])
    server.stop()
    result = send(["parent@example.org"], "Bulletin du trimestre", "En ligne.",
                  settings=settings, lang="en")
    assert result.status == "kept" and result.error is not None and result.error.transient
    server.start()
    handed: list[SendResult] = []
    with postier.OutboxFlusher(settings, interval=0.2, report=handed.append):
        wait_until(lambda: handed, "the flusher hands the kept e-mail over")
    (done,) = handed
    assert done.status == "queued" and done.kept_as == result.id
    (copy,) = server_copies(server, "Bulletin du trimestre")
    assert copy["id"] == done.id
    relay.wait_for(1)
