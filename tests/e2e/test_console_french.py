"""The console speaks the reader's language: with LANG=fr_FR.UTF-8 every word of `postier`
(help texts, usage errors, tables, states) is French, run as a person runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.core import TyperArgument, TyperGroup, TyperOption

from postier.cli import app
from postier.cli.language import help_text

FRENCH = "fr_FR.UTF-8"
# Words of Typer's, Click's and pydantic's English that must never reach a French reader.
ENGLISH = re.compile(r"\b(Usage|Error|Invalid|Missing|Try|for help|Input should|No such|"
                     r"unexpected|requires|Options possible|Show this message|required|"
                     r"default|env var|Arguments?:|Commands)\b")


def postier(home: Path, *args: str, lang: str = FRENCH, columns: int = 200,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POSTIER_DATA_DIR": str(home / "data"), "LANG": lang,
           "COLUMNS": str(columns), "POSTIER_CONFIG": str(home / "workstation.toml"),
           "POSTIER_OUTBOX": str(home / "outbox")}
    env.pop("LANGUAGE", None)
    env.pop("LC_ALL", None)
    return subprocess.run([sys.executable, "-m", "postier", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=60)


def said(r: subprocess.CompletedProcess[str]) -> str:
    """What the terminal shows, as read: panels' borders and line breaks taken away."""
    return " ".join(re.sub(r"[│╭╮╰╯─┃┏┓┗┛━┡┩╇┳┻╋┣┫└┘┌┐├┤┬┴┼]", " ", r.stdout + r.stderr).split())


@pytest.fixture
def home(tmp_path: Path) -> Path:
    r = postier(tmp_path, "users", "add", "admin", "--email", "direction@ac-lyon.fr",
                "--role", "admin", lang="C")
    assert r.returncode == 0, r.stderr
    return tmp_path


def test_usage_errors_are_french(home: Path) -> None:
    r = postier(home, "users", "add")
    assert r.returncode == 2
    text = said(r)
    assert re.search(r"Utilisation : .*postier users add \[OPTIONS\] \{username\}", text), text
    assert "Argument manquant : 'username'." in text
    assert "postier users add --help' pour obtenir de l'aide." in text
    assert not ENGLISH.search(text), text

    r = postier(home, "profiles", "add", "relais", "--host", "smtp.ac-lyon.fr", "--port", "abc")
    assert r.returncode == 2
    assert "Valeur incorrecte pour '--port' : doit être un nombre entier" in said(r), said(r)
    assert not ENGLISH.search(said(r)), said(r)

    for args, expected in [
        (("send", "--to"), "L'option '--to' attend une valeur."),
        (("users", "list", "--bogus"), "Option inconnue : --bogus"),
        (("userz",), "Commande inconnue : 'userz'."),
        (("users", "list", "en-trop"), "Argument(s) en trop : en-trop."),
        (("outbox", "watch", "--interval", "0"),
         "Valeur incorrecte pour '--interval' : doit valoir au moins 0.1"),
    ]:
        r = postier(home, *args)
        assert r.returncode == 2 and expected in said(r), (args, said(r))
        assert not ENGLISH.search(said(r)), (args, said(r))


def test_a_bad_setting_is_said_in_french_with_its_name(home: Path) -> None:
    r = postier(home, "settings", "set", "relay.port", "99999")
    assert r.returncode == 1
    assert said(r) == "Erreur : relay.port : doit valoir au plus 65535", said(r)
    r = postier(home, "settings", "set", "relay.port", "99999", lang="C")
    assert said(r) == "Error: relay.port: should be at most 65535", said(r)
    r = postier(home, "settings", "set", "relay.hots", "x")
    assert r.returncode == 1 and "Paramètre inconnu : 'relay.hots'." in said(r), said(r)


def test_settings_set_prints_only_what_changed(home: Path) -> None:
    r = postier(home, "settings", "set", "relay.port", "25")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "relay.port : 587 → 25", r.stdout
    r = postier(home, "settings", "set", "relay.port", "587", lang="C")
    assert r.stdout.strip() == "relay.port: 25 → 587", r.stdout
    r = postier(home, "settings", "set", "relay.port", "587")
    assert r.stdout.strip() == "Rien n'a changé.", r.stdout


def test_help_and_tables_are_french(home: Path) -> None:
    r = postier(home, "users", "add", "--help")
    text = said(r)
    assert r.returncode == 0
    for french in ("Utilisation : ", "postier users add [OPTIONS]",
                   "Créer un utilisateur de l'établissement",
                   "L'adresse e-mail de l'utilisateur", "[obligatoire]", "[par défaut : user]",
                   "Afficher ce message et quitter.", "Dossier des données du serveur",
                   "[variable d'environnement : POSTIER_DATA_DIR]"):
        assert french in text, (french, text)
    assert not ENGLISH.search(text), text
    r = postier(home, "--help")
    assert "Commandes" in said(r) and "COMMANDE [ARGUMENTS]..." in said(r), said(r)
    assert not ENGLISH.search(said(r)), said(r)

    r = postier(home, "users", "list")
    heading = r.stdout.splitlines()[1]
    assert [w.strip() for w in heading.strip("┃").split("┃")] == [
        "Identifiant", "Adresse e-mail", "Nom", "Rôle", "État"], heading
    assert "actif" in r.stdout
    r = postier(home, "establishments", "list")
    assert "Nom court" in r.stdout and "Hébergé" in r.stdout and "non" in r.stdout, r.stdout


def test_status_is_readable_and_json_for_programs(home: Path, closed_port: int) -> None:
    for key, value in [("mode", "own"), ("identity.name", "Alice Martin"),
                       ("identity.address", "alice.martin@ac-lyon.fr"),
                       ("smtp.host", "127.0.0.1"), ("smtp.port", str(closed_port)),
                       ("smtp.security", "none"), ("smtp.timeout", "2")]:
        r = postier(home, "config", "set", key, value)
        assert r.returncode == 0, r.stderr
    r = postier(home, "send", "--to", "parent@example.org", "--subject", "Sortie au musée",
                "--text", "Départ 8 h.")
    assert r.returncode == 75, said(r)
    assert r.stdout.startswith("gardé: "), r.stdout
    kept = r.stdout.split()[-1]

    r = postier(home, "status", kept)
    assert r.returncode == 0, r.stderr
    text = said(r)
    assert not r.stdout.lstrip().startswith("{"), "readable, not JSON"
    for french in (f"E-mail {kept}", "État différé", "Objet Sortie au musée",
                   "Tentatives 1", "Destinataire", "parent@example.org"):
        assert french in text, (french, text)

    r = postier(home, "status", kept, "--json")
    doc = json.loads(r.stdout)
    assert doc["id"] == kept and doc["status"] == "deferred"

    # A narrow terminal cuts the other columns, never the id that other commands take.
    r = postier(home, "outbox", "list", columns=60)
    assert r.returncode == 0, r.stderr
    assert kept in r.stdout, r.stdout


def _helps(command: typer.main.TyperGroup | object, path: str = "postier"
           ) -> list[tuple[str, str]]:
    """Every help text of the command tree: (where, text)."""
    found: list[tuple[str, str]] = []
    for text in (getattr(command, "help", None),):
        if text:
            found.append((path, text))
    for param in getattr(command, "params", []):
        if isinstance(param, TyperArgument | TyperOption) and param.help and not param.hidden:
            found.append((f"{path} {param.name}", param.help))
    if isinstance(command, TyperGroup):
        for name, sub in command.commands.items():
            if not sub.hidden:
                found += _helps(sub, f"{path} {name}")
    return found


def test_every_help_text_has_its_french() -> None:
    """Each command's and option's help, as `--help` shows it, exists in French: a new
    command whose help has no translation fails here."""
    helps = _helps(typer.main.get_command(app))
    assert len(helps) > 100, "the scan must see the whole command tree"
    untranslated = [f"{where}: {text!r}" for where, text in helps
                    if help_text("fr", text) == " ".join(text.split())]
    assert not untranslated, "no French for:\n" + "\n".join(untranslated)
