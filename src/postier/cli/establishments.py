"""``postier establishments``: the establishments of a hosted installation (operators)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from postier.cli.common import (
    CONSOLE,
    DatabaseUrl,
    DataDir,
    _config,
    _run,
    establishments_app,
    heading,
    out,
    yes_no,
)
from postier.cli.console import named_establishment, state_word
from postier.core import establishments
from postier.core.service import Postier
from postier.i18n import N_, system_language, translate


@establishments_app.command("add")
def establishments_add(
    slug: Annotated[str, typer.Argument(help=N_("Short name, e.g. clg-jean-moulin"))],
    name: Annotated[str, typer.Option("--name", help=N_("Full name"))] = "",
    hosted: Annotated[bool, typer.Option("--hosted", help=N_("Sends through the platform relay "
                                                          "with no setup"))] = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Add an establishment to this installation (hosting several schools)."""
    est = _run(_config(data_dir, database_url),
               lambda core: core.add_establishment(slug, name, hosted))
    lang = system_language()
    template = (N_("Establishment {slug} ({name}) created, hosted.") if est.hosted
                else N_("Establishment {slug} ({name}) created."))
    out.print(translate(lang, template, slug=est.slug, name=est.name), highlight=False)


@establishments_app.command("list")
def establishments_list(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """The establishments of this installation."""
    rows = _run(_config(data_dir, database_url), lambda core: core.store.list_establishments())
    lang = system_language()
    table = Table(*heading(lang, N_("Short name"), N_("Name"), N_("Hosted"), N_("State")))
    for e in rows:
        table.add_row(e.slug, e.name, yes_no(e.hosted, lang), state_word(e.disabled, lang))
    out.print(table)


@establishments_app.command("disable")
def establishments_disable(
    slug: str, data_dir: DataDir = None, database_url: DatabaseUrl = None
) -> None:
    """Disable an establishment: its users can no longer sign in or send."""

    async def action(core: Postier) -> None:
        await establishments.disable_establishment(core, CONSOLE,
                                                   await named_establishment(core, slug))

    _run(_config(data_dir, database_url), action)
    out.print(translate(system_language(), N_("Establishment {slug} disabled."), slug=slug),
              highlight=False)
