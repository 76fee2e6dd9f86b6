"""The ``postier`` command: run the server and administer it.

Administration commands work on the same data as the server (``--data-dir`` or
``POSTIER_DATA_DIR``, ``--database-url`` or ``POSTIER_DATABASE_URL``), also while it runs.
Errors are printed in the terminal's language (``LANG``) with what to do about them.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from postier.config import ServerConfig
from postier.errors import PostierError
from postier.i18n import system_language
from postier.service import Postier

T = TypeVar("T")

app = typer.Typer(
    help="Postier: outgoing e-mail for school software.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
users_app = typer.Typer(help="Accounts of the establishment.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens.", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")

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


def _fail(message: str, hint: str | None = None) -> None:
    err.print(f"[bold red]Error:[/] {message}", highlight=False)
    if hint:
        err.print(hint, highlight=False)
    raise typer.Exit(1)


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
        lang = system_language()
        _fail(exc.message(lang), exc.hint(lang))
        raise


@app.command()
def serve(
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    http: Annotated[
        str | None, typer.Option(help="HOST:PORT for the HTTP API (default 127.0.0.1:8025)")
    ] = None,
    no_delivery: Annotated[
        bool, typer.Option("--no-delivery", help="Accept e-mails only; another process delivers")
    ] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Start the server: the HTTP API and the delivery workers."""
    from postier import server

    extra: dict[str, Any] = {"http": http}
    if no_delivery:
        extra["delivery"] = False
    config = _config(data_dir, database_url, **extra)
    server.setup_logging(log_level)
    try:
        server.run(config)
    except PostierError as exc:
        lang = system_language()
        _fail(exc.message(lang), exc.hint(lang))
    except KeyboardInterrupt:
        pass


@users_app.command("add")
def users_add(
    username: str,
    email: Annotated[str, typer.Option("--email", help="The user's e-mail address")],
    name: Annotated[str, typer.Option("--name", help="Display name")] = "",
    role: Annotated[str, typer.Option("--role", help="admin or user")] = "user",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input")
    ] = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a user of the establishment."""
    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    if password_stdin and not password:
        _fail("No password on standard input.", "Example: echo 'secret' | postier users add ...")
    user = _run(
        _config(data_dir, database_url),
        lambda core: core.add_user(
            username, email, display_name=name, role=role, password=password
        ),
    )
    out.print(f"User {user.username} <{user.email}> created ({user.role}).", highlight=False)


@users_app.command("list")
def users_list(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """List the users of the establishment."""
    users = _run(_config(data_dir, database_url), lambda core: core.store.list_users(1))
    table = Table("username", "e-mail", "name", "role", "state")
    for u in users:
        table.add_row(u.username, u.email, u.display_name, u.role,
                      "disabled" if u.disabled else "active")
    out.print(table)


@tokens_app.command("create")
def tokens_create(
    username: str,
    name: Annotated[str, typer.Option("--name", help="What the token is for")] = "",
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create an API token for a user; the token is printed once, as the last line."""

    async def action(core: Postier) -> str:
        user = await core.find_user(username)
        token, _ = await core.create_token(user, name)
        return token

    token = _run(_config(data_dir, database_url), action)
    err.print(f"API token for {username} (shown only once; keep it secret):", highlight=False)
    print(token)


@tokens_app.command("list")
def tokens_list(
    username: str, data_dir: DataDir = None, database_url: DatabaseUrl = None
) -> None:
    """List a user's tokens (never their values)."""

    async def action(core: Postier) -> list[Any]:
        return await core.store.list_tokens((await core.find_user(username)).id)

    for t in _run(_config(data_dir, database_url), action):
        state = "revoked" if t.revoked_at else "active"
        out.print(json.dumps({"id": t.id, "name": t.name, "state": state}))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
