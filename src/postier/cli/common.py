"""What every ``postier`` command shares: the command tree, consoles, error display."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from postier.config import ServerConfig
from postier.errors import PostierError
from postier.i18n import system_language
from postier.service import Postier
from postier.store.base import User

T = TypeVar("T")

app = typer.Typer(
    help="Postier: outgoing e-mail for school software.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
users_app = typer.Typer(help="Accounts of the establishment.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens.", no_args_is_help=True)
settings_app = typer.Typer(
    help="Delivery settings of the establishment (Paramètres d'envoi des e-mails).",
    no_args_is_help=True,
)
profiles_app = typer.Typer(help="Sending profiles (profils d'envoi d'e-mails).",
                           no_args_is_help=True)
establishments_app = typer.Typer(
    help="Establishments of a hosted installation (operators).", no_args_is_help=True)
app.add_typer(establishments_app, name="establishments")
dkim_app = typer.Typer(help="DKIM signing of the establishment's domains.",
                       no_args_is_help=True)
app.add_typer(dkim_app, name="dkim")
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")
app.add_typer(settings_app, name="settings")
app.add_typer(profiles_app, name="profiles")

# Commands run at the server's console act as this administrator in the audit log: whoever
# can read the data directory already holds every key.
CONSOLE = User(id=0, establishment_id=1, username="console", email="", display_name="",
               role="admin", disabled=False)

workstation_config_app = typer.Typer(
    help="This workstation's sending settings (Paramétrer l'envoi d'e-mails pour ce poste).",
    no_args_is_help=True,
)
outbox_app = typer.Typer(help="E-mails waiting on this workstation.", no_args_is_help=True)
app.add_typer(workstation_config_app, name="config")
app.add_typer(outbox_app, name="outbox")

out = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="POSTIER_DATA_DIR", help="Data directory of the server"),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", envvar="POSTIER_DATABASE_URL", help="Default: SQLite"),
]


def _config(data_dir: Path | None, database_url: str | None, **extra: Any) -> ServerConfig:
    values: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}
    if data_dir is not None:
        values["data_dir"] = data_dir
    if database_url is not None:
        values["database_url"] = database_url
    try:
        return ServerConfig(**values)
    except ValidationError as exc:
        _fail(str(exc))
        raise


def _fail(message: str, hint: str | None = None) -> NoReturn:
    err.print(f"[bold red]Error:[/] {message}", highlight=False)
    if hint:
        err.print(hint, highlight=False)
    raise typer.Exit(1)


def fail_with(exc: PostierError) -> NoReturn:
    lang = system_language()
    _fail(exc.message(lang), exc.hint(lang))


def _run(config: ServerConfig, action: Callable[[Postier], Awaitable[T]]) -> T:
    """Open the installation, run one action, close; errors shown in the user's language."""

    async def main() -> T:
        core = Postier(config)
        await core.open()
        try:
            return await action(core)
        finally:
            await core.close()

    try:
        return asyncio.run(main())
    except PostierError as exc:
        fail_with(exc)


