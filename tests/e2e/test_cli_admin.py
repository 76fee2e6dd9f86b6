"""The administrator's console commands, run as a person runs them (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.oauth import make_certificate
from support.relay import FaultRelay


def postier(data_dir: Path, *args: str, stdin: str | None = None,
            lang: str = "C") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POSTIER_DATA_DIR": str(data_dir), "LANG": lang, "COLUMNS": "200"}
    env.pop("LANGUAGE", None)
    env.pop("LC_ALL", None)
    return subprocess.run([sys.executable, "-m", "postier", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    r = postier(tmp_path, "users", "add", "admin", "--email", "direction@ac-lyon.fr",
                "--role", "admin")
    assert r.returncode == 0, r.stderr
    return tmp_path


def test_settings_set_show_and_test(data_dir: Path, relay: FaultRelay) -> None:
    for key, value in [("relay.host", relay.host), ("relay.port", str(relay.port)),
                       ("relay.security", "none"), ("relay.timeout", "5"),
                       ("sender.address", "ne-pas-repondre@ac-lyon.fr"),
                       ("allowed_domains", "ac-lyon.fr, *.ac-lyon.fr")]:
        r = postier(data_dir, "settings", "set", key, value)
        assert r.returncode == 0, (key, r.stderr)
    shown = postier(data_dir, "settings", "show").stdout
    assert '"*.ac-lyon.fr"' in shown and str(relay.port) in shown
    r = postier(data_dir, "settings", "test", "--to", "verif@example.org")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "message (DATA)" in r.stdout and "OK" in r.stdout
    (got,) = relay.wait_for(1)
    assert got.rcpt_tos == ["verif@example.org"]


def test_settings_errors_are_clear(data_dir: Path, closed_port: int) -> None:
    r = postier(data_dir, "settings", "set", "relay.port", "99999")
    assert r.returncode == 1 and "relay.port" in r.stderr and "65535" in r.stderr
    r = postier(data_dir, "settings", "set", "relay.hots", "x")
    assert r.returncode == 1 and "relay.host" in r.stderr
    postier(data_dir, "settings", "set", "relay.host", "127.0.0.1")
    postier(data_dir, "settings", "set", "relay.port", str(closed_port))
    postier(data_dir, "settings", "set", "relay.security", "none")
    r = postier(data_dir, "settings", "test", "--to", "v@example.org", lang="fr_FR.UTF-8")
    assert r.returncode == 1 and "adresse d'expédition" in r.stderr, r.stderr
    postier(data_dir, "settings", "set", "sender.address", "ne-pas-repondre@ac-lyon.fr")
    r = postier(data_dir, "settings", "test", "--to", "v@example.org", lang="fr_FR.UTF-8")
    assert r.returncode == 1
    assert "connexion refusée" in r.stderr.lower(), r.stderr


def test_profiles_from_the_console(data_dir: Path) -> None:
    r = postier(data_dir, "profiles", "add", "Messagerie académique", "--host",
                "smtp.ac-lyon.fr", "--auth", "password", "--password-stdin",
                stdin="partage\n")
    assert r.returncode == 0, r.stderr
    r = postier(data_dir, "profiles", "add", "Messagerie académique", "--host", "x.fr")
    assert r.returncode == 1 and "already exists" in r.stderr
    r = postier(data_dir, "profiles", "edit", "Messagerie académique", "--port", "465",
                "--security", "tls")
    assert r.returncode == 0, r.stderr
    listing = postier(data_dir, "profiles", "list").stdout
    assert "smtp.ac-lyon.fr:465" in listing and "stored" in listing
    assert "partage" not in listing
    assert postier(data_dir, "profiles", "remove", "Messagerie académique").returncode == 0
    assert "smtp.ac-lyon.fr" not in postier(data_dir, "profiles", "list").stdout


def test_oauth2_certificate_and_key_are_set_together_from_files(
    data_dir: Path, tmp_path: Path
) -> None:
    key, cert = make_certificate()
    other_key, _ = make_certificate()
    files = {}
    for name, text in (("cert", cert), ("key", key), ("other", other_key)):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text(text)

    r = postier(data_dir, "settings", "oauth2-certificate", str(files["cert"]),
                str(files["other"]))
    assert r.returncode == 1
    assert "relay.oauth2_private_key: This private key does not match the certificate" in (
        " ".join(r.stderr.split()))
    assert '"oauth2_certificate_set": false' in postier(data_dir, "settings", "show").stdout

    r = postier(data_dir, "settings", "oauth2-certificate", str(files["cert"]),
                str(files["key"]))
    assert r.returncode == 0, r.stderr
    shown = postier(data_dir, "settings", "show").stdout
    assert '"oauth2_certificate_set": true' in shown
    assert '"oauth2_private_key_set": true' in shown
    assert "BEGIN" not in r.stdout + shown  # write-only

    r = postier(data_dir, "settings", "oauth2-certificate", str(files["cert"]),
                str(files["key"]), "--backup")
    assert r.returncode == 1 and "There is no backup relay yet" in r.stderr
    r = postier(data_dir, "settings", "oauth2-certificate", str(tmp_path / "missing.pem"),
                str(files["key"]))
    assert r.returncode == 2 and "does not exist" in r.stderr
