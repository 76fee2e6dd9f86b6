"""``postier settings``: the establishment's delivery settings from the server's console
(show, change one, a preset, OAuth2's certificate, the test-send), and how a test-send's
report and a change of the settings are shown."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.table import Table

from postier.cli.common import (
    CONSOLE,
    DatabaseUrl,
    DataDir,
    _config,
    _fail,
    _run,
    err,
    heading,
    out,
    settings_app,
    yes_no,
)
from postier.cli.language import pydantic_problems
from postier.core.presets import PRESETS
from postier.core.service import Postier
from postier.delivery.diagnose import STEP_LABELS
from postier.i18n import N_, system_language, translate


def _flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"relay": {"port": 25}}`` as ``{"relay.port": 25}``."""
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value: Any, lang: str) -> str:
    if isinstance(value, bool):
        return yes_no(value, lang)
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(x) for x in value)
    return str(value)


def print_changes(before: dict[str, Any], after: dict[str, Any], lang: str) -> None:
    """What a change of the settings changed, one line a setting (« relay.port : 25 → 587 »),
    then the warnings of the settings as saved."""
    old, new = _flat(before), _flat(after)
    changed = [k for k in new if k not in ("warnings", "hosted") and old.get(k) != new[k]]
    for key in changed:
        out.print(translate(lang, N_("{key}: {old} → {new}"), key=key,
                            old=_shown(old.get(key), lang), new=_shown(new[key], lang)),
                  highlight=False)
    if not changed:
        out.print(translate(lang, N_("Nothing changed.")), highlight=False)
    for warning in after.get("warnings") or []:
        err.print(f"⚠ {warning}", highlight=False)


def _parse_value(key: str, raw: str) -> Any:
    if key == "allowed_domains":
        return [d.strip() for d in raw.replace(",", " ").split() if d.strip()]
    if raw.lower() in ("true", "false", "yes", "no", "on", "off"):
        return raw.lower() in ("true", "yes", "on")
    if raw.isdigit():
        return int(raw)
    return raw


@settings_app.command("show")
def settings_show(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Show the settings (the relay password only as password_set)."""
    doc = _run(_config(data_dir, database_url), lambda core: core.get_settings(CONSOLE))
    out.print_json(json.dumps(doc, ensure_ascii=False))


@settings_app.command("set")
def settings_set(
    key: Annotated[str, typer.Argument(help=N_("Dotted key, e.g. relay.host, sender.address, "
                                            "allowed_domains, delegation, retry.max_age"))],
    value: Annotated[str, typer.Argument(
        help=N_("The value; allowed_domains: comma-separated; - reads it from standard input "
        "(for relay.password, so it stays out of the shell history)"))],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Change one setting; the whole settings are validated before anything is saved."""
    if value == "-":
        value = sys.stdin.readline().rstrip("\r\n")
    lang = system_language()

    async def action(core: Postier) -> tuple[dict[str, Any], dict[str, Any]]:
        before = await core.get_settings(CONSOLE, lang)
        current = (await core.stored_settings(1)).model_dump(mode="json")
        section, _, leaf = key.partition(".")
        if section not in current or (leaf and not isinstance(current[section], dict)) or (
            leaf and leaf not in current[section]
        ):
            names = [
                f"{sec}.{k}" for sec, sub in current.items() if isinstance(sub, dict)
                for k in sub
            ] + [sec for sec, sub in current.items() if not isinstance(sub, dict)]
            _fail(translate(lang, N_("Unknown setting {key!r}."), key=key),
                  translate(lang, N_("Settings: {names}"), names=", ".join(sorted(names))))
        if leaf:
            current[section][leaf] = _parse_value(leaf, value)
            payload = {section: current[section]}
        else:
            payload = {section: _parse_value(section, value)}
        return before, await core.put_settings(CONSOLE, payload, lang)

    try:
        before, after = _run(_config(data_dir, database_url), action)
    except ValidationError as exc:
        _fail(pydantic_problems(exc, lang))
    print_changes(before, after, lang)


@settings_app.command("oauth2-certificate")
def settings_oauth2_certificate(
    certificate: Annotated[Path, typer.Argument(
        help=N_("The certificate registered for the application in Entra ID (PEM file)"),
        exists=True, dir_okay=False, readable=True)],
    private_key: Annotated[Path, typer.Argument(
        help=N_("Its private key (PEM file, not encrypted)"), exists=True, dir_okay=False,
        readable=True)],
    backup: Annotated[bool, typer.Option("--backup", help=N_("For the backup relay"))] = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """OAuth2 with a certificate (Microsoft 365): store the certificate and its private
    key, checked together, encrypted at rest and never shown again. Then set
    relay.auth to oauth2."""
    section = "backup_relay" if backup else "relay"
    lang = system_language()
    try:
        pems = {"oauth2_certificate": certificate.read_text(),
                "oauth2_private_key": private_key.read_text()}
    except (OSError, UnicodeDecodeError) as exc:
        _fail(translate(lang, N_("Cannot read the PEM files: {error}."), error=exc),
              translate(lang, N_("Give the certificate and the key as text files "
                                 "(-----BEGIN …).")))

    async def action(core: Postier) -> tuple[dict[str, Any], dict[str, Any]]:
        before = await core.get_settings(CONSOLE, lang)
        current = (await core.stored_settings(1)).model_dump(mode="json")
        if current.get(section) is None:
            _fail(translate(lang, N_("There is no backup relay yet.")),
                  translate(lang, N_("Add it first, on the settings page or with PUT "
                                     "/api/v1/settings.")))
        return before, await core.put_settings(CONSOLE, {section: {**current[section], **pems}},
                                               lang)

    try:
        before, after = _run(_config(data_dir, database_url), action)
    except ValidationError as exc:
        _fail(pydantic_problems(exc, lang, prefix=section, strip=(section,)))
    print_changes(before, after, lang)


@settings_app.command("preset")
def settings_preset(
    name: Annotated[str, typer.Argument(
        help=N_("microsoft365, google-workspace, google-relay or academy"))],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Fill the SMTP server settings from a preset (username and password are kept)."""
    lang = system_language()
    if name not in PRESETS:
        _fail(translate(lang, N_("Unknown preset {name!r}."), name=name),
              translate(lang, N_("Presets: {names}"), names=", ".join(PRESETS)))
    relay = {k: v for k, v in PRESETS[name]["relay"].items() if v != "" or k != "host"}

    async def action(core: Postier) -> tuple[dict[str, Any], dict[str, Any]]:
        before = await core.get_settings(CONSOLE, lang)
        return before, await core.put_settings(CONSOLE, {"relay": relay}, lang)

    print_changes(*_run(_config(data_dir, database_url), action), lang)


@settings_app.command("test")
def settings_test(
    to: Annotated[str, typer.Option("--to", help=N_("Who receives the test e-mail"))],
    check_senders: Annotated[
        bool, typer.Option("--check-senders", help=N_("Also check the policy's sender addresses"))
    ] = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Tester l'envoi d'e-mails: send a real test e-mail with the saved settings and
    report every step."""
    lang = system_language()
    report = _run(
        _config(data_dir, database_url),
        lambda core: core.admin.test_settings(CONSOLE, to, None, lang,
                                              check_senders=check_senders),
    )
    print_report(report.as_dict())
    if not report.ok:
        raise typer.Exit(1)


def print_report(report: dict[str, Any]) -> None:
    """Show a test-send report as a person reads it."""
    lang = system_language()
    table = Table("", *heading(lang, N_("Step"), N_("ms"), N_("Detail")))
    for s in report["steps"]:
        table.add_row("[green]✓[/]" if s["ok"] else "[red]✗[/]",
                      translate(lang, STEP_LABELS.get(s["step"], s["step"])), str(s["ms"]),
                      s["detail"])
    out.print(table)
    if report.get("error"):
        e = report["error"]
        err.print(f"[bold red]{e['message']}[/]", highlight=False)
        if e.get("hint"):
            err.print(e["hint"], highlight=False)
    else:
        out.print(f"[green]OK[/] ({report.get('latency_ms')} ms)", highlight=False)
        if report.get("suggestion"):
            out.print(report["suggestion"], highlight=False)
    for c in report.get("sender_checks") or []:
        mark = "[green]✓[/]" if c["ok"] else "[red]✗[/]"
        out.print(f"{mark} MAIL FROM:<{c['address']}> {c.get('code') or ''} {c.get('reply') or ''}",
                  highlight=False)
