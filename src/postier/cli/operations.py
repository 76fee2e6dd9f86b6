"""Console commands for running Postier day to day: ``postier doctor``, ``postier purge``
and, for a hosted installation, ``postier domains move``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from postier.cli.common import CONSOLE, DatabaseUrl, DataDir, _config, _run, app, out
from postier.core.domains import MoveReport
from postier.core.service import Postier
from postier.i18n import N_, system_language, translate

_MARKS = {"ok": ("✓", "green"), "warn": ("⚠", "yellow"), "fail": ("✗", "red")}


@app.command()
def doctor(
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help=N_("Print the checks as JSON"))] = False,
    dns: Annotated[bool, typer.Option(
        "--dns", help=N_("Also check each sending domain's SPF, DKIM and DMARC in the DNS"))
    ] = False,
) -> None:
    """Check this installation: configuration, database and migrations, key file, stored
    secrets, disk space, relay (greeted, nothing sent), clock; with --dns, the sending
    domains' SPF, DKIM and DMARC. Exit status 0 when all is well, 1 on a warning, 2 on a
    failure (for cron or a monitoring system)."""
    # Loaded by this command only: the other commands start without it.
    from postier.ops.doctor import diagnose, exit_status

    lang = system_language()
    checks = asyncio.run(diagnose(_config(data_dir, database_url), lang, dns))
    status = exit_status(checks)
    if as_json:
        print(json.dumps({"status": ("ok", "warn", "fail")[status],
                          "checks": [c.as_dict() for c in checks]}, ensure_ascii=False))
        raise typer.Exit(status)
    table = Table("", translate(lang, N_("Check")), translate(lang, N_("Result")),
                  show_lines=True)
    for c in checks:
        mark, colour = _MARKS[c.level]
        cell = Text(c.result)
        if c.remedy:
            cell.append("\n→ " + c.remedy, style="bold")
        table.add_row(Text(mark, style=colour), c.label, cell)
    out.print(table)
    summary = {
        0: N_("Everything looks right."),
        1: N_("Postier works, but something needs attention (⚠ above)."),
        2: N_("Something does not work (✗ above): follow the remedies."),
    }[status]
    out.print(Text(translate(lang, summary), style=_MARKS[("ok", "warn", "fail")[status]][1]))
    raise typer.Exit(status)


@app.command()
def purge(
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help=N_("Only count what would be removed"))] = False,
) -> None:
    """Apply the retention of personal data now: remove the bodies, then the records, of
    e-mails sent, failed or cancelled longer ago than each establishment's retention
    (settings retention.body_days and retention.metadata_days). The server does it by
    itself every hour; e-mails still waiting are never removed."""
    # Loaded by this command only: the other commands start without it.
    from postier.ops.retention import purge as run_purge

    lang = system_language()

    async def action(core: Postier) -> dict[str, object]:
        report = await run_purge(core, dry_run=dry_run, actor="console")
        return report.as_dict()

    report = _run(_config(data_dir, database_url), action)
    table = Table(translate(lang, N_("Establishment")),
                  translate(lang, N_("Kept (days): body / record")),
                  translate(lang, N_("Bodies")), translate(lang, N_("Records")))
    for e in report["establishments"]:  # type: ignore[attr-defined]
        table.add_row(e["slug"], f"{e['body_days']} / {e['metadata_days']}",
                      str(e["bodies"]), str(e["messages"]))
    out.print(table)
    template = (
        N_("Dry run: {bodies} e-mail bodies and {messages} e-mail records would be removed; "
           "nothing was changed.")
        if dry_run
        else N_("{bodies} e-mail bodies and {messages} e-mail records removed.")
    )
    out.print(translate(lang, template, bodies=report["bodies"], messages=report["messages"]),
              highlight=False)


domains_app = typer.Typer(help=N_("Which establishment holds which domain (operators)."),
                          no_args_is_help=True)
app.add_typer(domains_app, name="domains")


@domains_app.command("move")
def domains_move(
    domain: Annotated[str, typer.Argument(help=N_("The domain, e.g. ac-lyon.fr (its "
                                               "sub-domains move with it)"))],
    to: Annotated[str, typer.Option("--to", help=N_("Short name of the establishment that "
                                                 "receives it"))],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Give a domain to another establishment: taken from those that held it (allowed
    domains, sender address, addresses granted to users), its DKIM keys moving with it;
    audited in each establishment."""
    lang = system_language()
    operator = dataclasses.replace(CONSOLE, role="operator")

    async def action(core: Postier) -> MoveReport:
        return await core.domains.move(operator, domain, to)

    report = _run(_config(data_dir, database_url), action)
    out.print(translate(lang, N_("{domain} now belongs to {to} (taken from: {sources})."),
                        domain=report.domain, to=report.to,
                        sources=", ".join(report.sources) or "-"), highlight=False)
    for slug in report.sender_cleared:
        out.print(translate(lang, N_("The sender address of {slug} was in {domain}: it is now "
                                     "empty, ask its administrator to set another one."),
                            slug=slug, domain=report.domain), highlight=False)
