"""``postier users`` and ``postier tokens``: the establishment's accounts and their API
tokens, from the server's console."""

from __future__ import annotations

import getpass
import sys
from typing import Annotated, Any

import typer
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
    tokens_app,
    users_app,
)
from postier.cli.console import EstablishmentOption, establishment_id_of, member, state_word
from postier.core import establishments
from postier.core.service import Postier
from postier.i18n import N_, system_language, translate
from postier.store.base import User


@users_app.command("add")
def users_add(
    username: str,
    email: Annotated[str, typer.Option("--email", help=N_("The user's e-mail address"))],
    name: Annotated[str, typer.Option("--name", help=N_("Display name"))] = "",
    role: Annotated[str, typer.Option("--role", help=N_("admin, user or operator"))] = "user",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help=N_("Read the password from standard input"))
    ] = False,
    establishment: EstablishmentOption = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a user of the establishment (an operator serves every establishment)."""
    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    if password_stdin and not password:
        lang = system_language()
        _fail(translate(lang, N_("No password on standard input.")),
              translate(lang, N_("Example: echo 'secret' | postier users add ...")))

    async def action(core: Postier) -> Any:
        est_id = await establishment_id_of(core, establishment)
        return await core.add_user(username, email, display_name=name, role=role,
                                   password=password, establishment_id=est_id)

    user = _run(_config(data_dir, database_url), action)
    out.print(translate(system_language(), N_("User {username} <{email}> created ({role})."),
                        username=user.username, email=user.email, role=user.role),
              highlight=False)


PASSWORD_PROMPT = N_("New password for {username}: ")
PASSWORD_AGAIN = N_("The same password again: ")
PASSWORD_SHORT = N_("A password has at least 8 characters.")
PASSWORD_DIFFERENT = N_("The two passwords are different.")
PASSWORD_SET = N_("The password of {username} is set: they can sign in to the web pages.")


def _new_password(username: str, from_stdin: bool, lang: str) -> str:
    """The password typed twice at a terminal (hidden), or read from standard input."""
    if from_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(translate(lang, PASSWORD_PROMPT, username=username))
        if getpass.getpass(translate(lang, PASSWORD_AGAIN)) != password:
            _fail(translate(lang, PASSWORD_DIFFERENT))
    if len(password) < 8:
        _fail(translate(lang, PASSWORD_SHORT),
              translate(lang, N_("Example: echo 'a long passphrase' | postier users "
                                 "set-password {username} --password-stdin"),
                        username=username))
    return password


@users_app.command("set-password")
def users_set_password(
    username: Annotated[str, typer.Argument(help=N_("Username or e-mail address"))],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help=N_("Read the password from standard input"))
    ] = False,
    establishment: EstablishmentOption = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Set a user's password (asked twice, hidden); their open sessions end."""
    lang = system_language()
    password = _new_password(username, password_stdin, lang)

    async def action(core: Postier) -> User:
        user = await member(core, username, establishment)
        await establishments.set_password(core, CONSOLE, user, password)
        return user

    user = _run(_config(data_dir, database_url), action)
    out.print(translate(lang, PASSWORD_SET, username=user.username), highlight=False)


@users_app.command("list")
def users_list(establishment: EstablishmentOption = None, data_dir: DataDir = None,
               database_url: DatabaseUrl = None) -> None:
    """List the users of the establishment."""

    async def action(core: Postier) -> Any:
        return await core.store.list_users(await establishment_id_of(core, establishment))

    users = _run(_config(data_dir, database_url), action)
    lang = system_language()
    table = Table(*heading(lang, N_("Username"), N_("E-mail address"), N_("Name"), N_("Role"),
                           N_("State")))
    for u in users:
        table.add_row(u.username, u.email, u.display_name, u.role, state_word(u.disabled, lang))
    out.print(table)


@tokens_app.command("create")
def tokens_create(
    username: str,
    name: Annotated[str, typer.Option("--name", help=N_("What the token is for"))] = "",
    establishment: EstablishmentOption = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create an API token for a user; the token is printed once, as the last line."""

    async def action(core: Postier) -> str:
        user = await member(core, username, establishment)
        token, _ = await core.create_token(user, name)
        return token

    token = _run(_config(data_dir, database_url), action)
    err.print(translate(system_language(), N_("API token for {username} (shown only once; "
                                              "keep it secret):"), username=username),
              highlight=False)
    print(token)


@tokens_app.command("list")
def tokens_list(
    username: str, establishment: EstablishmentOption = None, data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """List a user's tokens (never their values)."""

    async def action(core: Postier) -> list[Any]:
        return await core.store.list_tokens((await member(core, username, establishment)).id)

    lang = system_language()
    table = Table(*heading(lang, N_("Id"), N_("Name"), N_("State")))
    for t in _run(_config(data_dir, database_url), action):
        state = N_("revoked") if t.revoked_at else N_("active")
        table.add_row(str(t.id), t.name, translate(lang, state))
    out.print(table)
