"""``postier profiles``: the establishment's sending profiles, from the server's console;
from a workstation, ``list`` asks the server and ``pull`` takes one into the workstation's
settings."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.table import Table

from postier.cli.common import (
    CONSOLE,
    DatabaseUrl,
    DataDir,
    T,
    _config,
    _fail,
    _run,
    fail_with,
    heading,
    out,
    profiles_app,
    workstation_settings,
)
from postier.cli.language import pydantic_problems
from postier.core.service import Postier
from postier.errors import NotFound, PostierError
from postier.i18n import N_, system_language, translate
from postier.server.config import ServerConfig
from postier.workstation import settings_file
from postier.workstation.client import client_for
from postier.workstation.sending import pull_profile

ProfileOpt = Annotated[str | None, typer.Option(help=N_("SMTP server host"))]


def _profile_payload(
    label: str, host: str | None, port: int | None, security: str | None, auth: str | None,
    username: str | None, password_stdin: bool, timeout: int | None,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {k: v for k, v in (base or {}).items()
                               if k not in ("id", "password_set")}
    payload["label"] = label
    for k, v in (("host", host), ("port", port), ("security", security), ("auth", auth),
                 ("username", username), ("timeout", timeout)):
        if v is not None:
            payload[k] = v
    payload["password"] = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    return payload


@profiles_app.command("list")
def profiles_list(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """List the establishment's sending profiles (no password shown): from the server's
    data (--data-dir) at its console, or through the server from a workstation."""
    if data_dir is None and database_url is None:
        list_server_profiles()
        return
    rows = _run(_config(data_dir, database_url), lambda core: core.admin.list_profiles(CONSOLE))
    lang = system_language()
    table = Table(*heading(lang, N_("Id"), N_("Label"), N_("Server"), N_("Security"),
                           N_("Sign-in"), N_("Username"), N_("Password")))
    for p in rows:
        table.add_row(str(p["id"]), p["label"], f"{p['host']}:{p['port']}", p["security"],
                      p["auth"], p["username"],
                      translate(lang, N_("stored")) if p["password_set"] else "-")
    out.print(table)


@profiles_app.command("add")
def profiles_add(
    label: str,
    host: Annotated[str, typer.Option(help=N_("SMTP server host"))],
    port: Annotated[int, typer.Option(help=N_("SMTP port"))] = 587,
    security: Annotated[str, typer.Option(help=N_("none, starttls or tls"))] = "starttls",
    auth: Annotated[str, typer.Option(help=N_("none or password"))] = "none",
    username: Annotated[str, typer.Option(help=N_("Shared username (optional)"))] = "",
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help=N_("Read a shared password from stdin"))] = False,
    timeout: Annotated[int, typer.Option(help=N_("Server timeout in seconds"))] = 30,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a sending profile."""
    payload = _profile_payload(label, host, port, security, auth, username, password_stdin,
                               timeout)
    p = _run_validated(_config(data_dir, database_url),
                       lambda core: core.admin.create_profile(CONSOLE, payload))
    out.print(translate(system_language(), N_("Profile {id} {label!r} created."),
                        id=p["id"], label=p["label"]), highlight=False)


@profiles_app.command("edit")
def profiles_edit(
    label: str,
    new_label: Annotated[str | None, typer.Option(help=N_("Rename the profile"))] = None,
    host: ProfileOpt = None,
    port: Annotated[int | None, typer.Option(help=N_("SMTP port"))] = None,
    security: Annotated[str | None, typer.Option(help=N_("none, starttls or tls"))] = None,
    auth: Annotated[str | None, typer.Option(help=N_("none or password"))] = None,
    username: Annotated[str | None, typer.Option(help=N_("Shared username"))] = None,
    password_stdin: Annotated[bool, typer.Option("--password-stdin",
                                                 help=N_("Read a new shared password"))] = False,
    timeout: Annotated[int | None, typer.Option(help=N_("Server timeout in seconds"))] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Change a sending profile (options not given stay as they are)."""

    async def action(core: Postier) -> dict[str, Any]:
        current = await _find_profile(core, label)
        payload = _profile_payload(new_label or label, host, port, security, auth, username,
                                   password_stdin, timeout, base=current)
        return await core.admin.update_profile(CONSOLE, current["id"], payload)

    p = _run_validated(_config(data_dir, database_url), action)
    out.print(translate(system_language(), N_("Profile {label!r} updated."),
                        label=p["label"]), highlight=False)


@profiles_app.command("remove")
def profiles_remove(label: str, data_dir: DataDir = None,
                    database_url: DatabaseUrl = None) -> None:
    """Delete a sending profile."""

    async def action(core: Postier) -> None:
        await core.admin.delete_profile(CONSOLE, (await _find_profile(core, label))["id"])

    _run(_config(data_dir, database_url), action)
    out.print(translate(system_language(), N_("Profile {label!r} removed."), label=label),
              highlight=False)


async def _find_profile(core: Postier, label: str) -> dict[str, Any]:
    for p in await core.admin.list_profiles(CONSOLE):
        if p["label"] == label or str(p["id"]) == label:
            return p
    raise NotFound(N_("There is no sending profile {id}."), id=label)


def _run_validated(config: ServerConfig, action: Callable[[Postier], Awaitable[T]]) -> T:
    try:
        return _run(config, action)
    except ValidationError as exc:
        _fail(pydantic_problems(exc, system_language()))


@profiles_app.command("pull")
def profiles_pull(
    label: Annotated[str, typer.Argument(
        help=N_("The profile's label (see postier profiles list)"))],
) -> None:
    """"Récupérer un profil d'envoi d'e-mails": retrieve a profile from the server into this
    workstation's settings (your own username and password are kept if it has none)."""
    try:
        s = pull_profile(label, workstation_settings())
    except PostierError as exc:
        fail_with(exc)
    settings_file.save(s)
    out.print(translate(system_language(), N_("Profile {label!r} retrieved: this workstation "
                                              "sends through {host}:{port}."),
                        label=s.profile.label, host=s.smtp.host, port=s.smtp.port),
              highlight=False)


def list_server_profiles() -> None:
    """``postier profiles list`` on a workstation: the server's profiles."""
    try:
        with client_for(workstation_settings()) as c:
            rows = c.profiles()
    except PostierError as exc:
        fail_with(exc)
    table = Table(*heading(system_language(), N_("Label"), N_("Server"), N_("Security"),
                           N_("Sign-in")))
    for p in rows:
        table.add_row(p["label"], f"{p['host']}:{p['port']}", p["security"], p["auth"])
    out.print(table)
