"""A workstation that pulled a profile is ready to send: its sender identity comes from
the account its token belongs to. "Définir mes propres paramètres" exists at the console as
``postier config own``. Real CLI, real server, real relay."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from support.relay import FaultRelay
from support.server import PostierServer

pytestmark = pytest.mark.in_process


class Workstation:
    def __init__(self, home: Path) -> None:
        self.config = home / "workstation.toml"
        self.env = {**os.environ, "POSTIER_CONFIG": str(self.config),
                    "POSTIER_OUTBOX": str(home / "outbox"), "COLUMNS": "200"}
        for var in ("LANGUAGE", "LC_ALL", "POSTIER_DATA_DIR"):
            self.env.pop(var, None)

    def run(self, *args: str, lang: str = "C", stdin: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "postier", *args], capture_output=True,
                              text=True, env={**self.env, "LANG": lang}, timeout=60,
                              input=stdin)

    def saved(self) -> dict[str, object]:
        return tomllib.loads(self.config.read_text(encoding="utf-8"))


@pytest.fixture
def ws(tmp_path: Path) -> Workstation:
    return Workstation(tmp_path / "poste")


def test_profiles_pull_then_send_needs_no_identity(
    ws: Workstation, server: PostierServer, relay: FaultRelay
) -> None:
    with server.client() as admin:
        assert admin.post("/api/v1/profiles", json={
            "label": "Relais du collège", "host": relay.host, "port": relay.port,
            "security": "none", "auth": "none", "timeout": 5}).status_code == 201
    # What the first hour leaves on a workstation: the server and the token, nothing else.
    for key, value in (("server.url", server.url), ("server.token", server.tokens["bob"])):
        assert ws.run("config", "set", key, value).returncode == 0
    r = ws.run("profiles", "pull", "Relais du collège")
    assert r.returncode == 0, r.stderr
    r = ws.run("send", "--to", "parent@example.org", "--subject", "Sortie",
               "--text", "Bonjour")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identity.address" not in r.stderr
    (got,) = relay.wait_for(1)
    assert got.mail_from == "bob.durand@gmail.com"
    assert got.message["From"].addresses[0].display_name == "Bob Durand"


def test_profiles_pull_keeps_an_identity_the_user_set(
    ws: Workstation, server: PostierServer, relay: FaultRelay
) -> None:
    with server.client() as admin:
        admin.post("/api/v1/profiles", json={"label": "Relais", "host": relay.host,
                                             "port": relay.port, "security": "none"})
    for key, value in (("server.url", server.url), ("server.token", server.tokens["bob"]),
                       ("identity.name", "M. Durand")):
        assert ws.run("config", "set", key, value).returncode == 0
    assert ws.run("profiles", "pull", "Relais").returncode == 0
    assert ws.saved()["identity"] == {"name": "M. Durand", "address": "bob.durand@gmail.com"}


def test_define_my_own_parameters_at_the_console(ws: Workstation, relay: FaultRelay) -> None:
    help_fr = ws.run("config", "--help", lang="fr_FR.UTF-8")
    assert "own" in help_fr.stdout and "Définir mes propres paramètres" in help_fr.stdout, (
        help_fr.stdout)
    help_en = ws.run("config", "own", "--help")
    assert "Define my own parameters" in help_en.stdout, help_en.stdout
    r = ws.run("config", "own", "--host", relay.host, "--port", str(relay.port),
               "--security", "none", "--auth", "password", "--username", "alice",
               "--password-stdin", "--name", "Alice Martin",
               "--address", "alice.martin@ac-lyon.fr", stdin="secret\n")
    assert r.returncode == 0, r.stderr
    saved = ws.saved()
    assert saved["mode"] == "own"
    assert saved["smtp"]["host"] == relay.host and saved["smtp"]["password"] == "secret"  # type: ignore[index]
    r = ws.run("config", "own", "--security", "ssl")
    assert r.returncode == 1 and "security" in r.stderr
