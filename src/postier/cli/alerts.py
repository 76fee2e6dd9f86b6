"""``postier alerts list``: the establishment's incidents, open first."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any

import typer
from rich.table import Table

from postier.cli.common import CONSOLE, DatabaseUrl, DataDir, _config, _run, app, out, when
from postier.cli.console import EstablishmentOption, establishment_id_of
from postier.core.service import Postier
from postier.i18n import N_, system_language, translate

alerts_app = typer.Typer(help=N_("Alerts of the establishment: incidents open now and past."),
                         no_args_is_help=True)
app.add_typer(alerts_app, name="alerts")


@alerts_app.command("list")
def alerts_list(
    establishment: EstablishmentOption = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    limit: Annotated[int, typer.Option(help=N_("At most this many incidents"))] = 50,
    as_json: Annotated[bool, typer.Option("--json", help=N_("Print them as JSON"))] = False,
) -> None:
    """The incidents of the establishment (relay failing, e-mails waiting too long, an
    OAuth2 secret about to expire), open ones first. Exit status 1 while one is open, so
    that a monitoring system can run it."""
    # Loaded by this command only: the other commands start without it.
    from postier.ops.alerts import list_alerts

    lang = system_language()

    async def action(core: Postier) -> list[dict[str, Any]]:
        actor = dataclasses.replace(
            CONSOLE, establishment_id=await establishment_id_of(core, establishment))
        return await list_alerts(core, actor, lang, limit)

    found = _run(_config(data_dir, database_url), action)
    open_now = any(a["status"] == "open" for a in found)
    if as_json:
        print(json.dumps(found, ensure_ascii=False))
        raise typer.Exit(1 if open_now else 0)
    if not found:
        out.print(translate(lang, N_("No incident so far.")), highlight=False)
        return
    table = Table(translate(lang, N_("State")), translate(lang, N_("Began")),
                  translate(lang, N_("Ended")), translate(lang, N_("What happens")),
                  show_lines=True)
    states = {"open": N_("open"), "resolved": N_("over")}
    for a in found:
        table.add_row(translate(lang, states[a["status"]]), when(a["started_at"], lang),
                      when(a["resolved_at"], lang), f"{a['message']}\n→ {a['hint'] or ''}")
    out.print(table)
    raise typer.Exit(1 if open_now else 0)
