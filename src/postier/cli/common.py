"""What every ``postier`` command shares: the command tree, consoles, error display."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from postier.cli.language import pydantic_problems, speak
from postier.core.service import Postier
from postier.errors import PostierError
from postier.i18n import N_, system_language, translate
from postier.server.config import ServerConfig
from postier.store.base import User
from postier.workstation import settings_file
from postier.workstation.settings_file import WorkstationSettings

T = TypeVar("T")


class _Console(typer.Typer):
    """The ``postier`` command, built in the reader's language (``LANG``) when it runs."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        command = typer.main.get_command(self)
        speak(command, system_language())
        return command(*args, **kwargs)


app = _Console(
    help=N_("Postier: outgoing e-mail for school software."),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
users_app = typer.Typer(help=N_("Accounts of the establishment."), no_args_is_help=True)
tokens_app = typer.Typer(help=N_("API tokens."), no_args_is_help=True)
settings_app = typer.Typer(
    help=N_("Delivery settings of the establishment (Paramètres d'envoi des e-mails)."),
    no_args_is_help=True,
)
profiles_app = typer.Typer(help=N_("Sending profiles (profils d'envoi d'e-mails)."),
                           no_args_is_help=True)
establishments_app = typer.Typer(
    help=N_("Establishments of a hosted installation (operators)."), no_args_is_help=True)
app.add_typer(establishments_app, name="establishments")
dkim_app = typer.Typer(help=N_("DKIM signing of the establishment's domains."),
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
    help=N_("This workstation's sending settings (Paramétrer l'envoi d'e-mails pour ce poste)."),
    no_args_is_help=True,
)
outbox_app = typer.Typer(help=N_("E-mails waiting on this workstation."), no_args_is_help=True)
app.add_typer(workstation_config_app, name="config")
app.add_typer(outbox_app, name="outbox")

out = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="POSTIER_DATA_DIR", help=N_("Data directory of the server")),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", envvar="POSTIER_DATABASE_URL", help=N_("Default: SQLite")),
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
        _fail(pydantic_problems(exc, system_language()))


def _fail(message: str, hint: str | None = None) -> NoReturn:
    label = translate(system_language(), N_("Error:"))
    err.print(f"[bold red]{label}[/] {escape(message)}", highlight=False)
    if hint:
        err.print(hint, highlight=False)
    raise typer.Exit(1)


def fail_with(exc: PostierError) -> NoReturn:
    lang = system_language()
    _fail(exc.message(lang), exc.hint(lang))


def workstation_settings() -> WorkstationSettings:
    """This workstation's settings file, read now; an unreadable one ends the command."""
    try:
        return settings_file.load()
    except PostierError as exc:
        fail_with(exc)


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


_DATE_FORMATS = {"fr": "%d/%m/%Y %H:%M", "en": "%Y-%m-%d %H:%M"}


def when(value: str | None, lang: str) -> str:
    """A moment given by the server (ISO 8601) as the reader writes dates, in local time."""
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone()
    return moment.strftime(_DATE_FORMATS.get(lang, _DATE_FORMATS["en"]))


def yes_no(flag: bool, lang: str) -> str:
    return translate(lang, N_("yes") if flag else N_("no"))


def heading(lang: str, *names: str) -> list[str]:
    """Column headings in the reader's language."""
    return [translate(lang, name) for name in names]


# The states of an e-mail and of its recipients, as the console names them.
STATUS_WORDS = {
    "queued": N_("queued"),
    "sending": N_("being sent"),
    "deferred": N_("deferred"),
    "sent": N_("sent"),
    "failed": N_("failed"),
    "cancelled": N_("cancelled"),
    "pending": N_("waiting"),
    "bounced": N_("bounced"),
    "suppressed": N_("suppressed"),
    "kept": N_("kept"),
    "handed over": N_("handed over"),
}


def status_word(status: str, lang: str) -> str:
    return translate(lang, STATUS_WORDS.get(status, status))
