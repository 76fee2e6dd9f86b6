"""``postier dkim``: the DKIM keys of the establishment's domains and their DNS records."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from postier.cli.common import DatabaseUrl, DataDir, _config, _run, dkim_app, err, out
from postier.cli.console import EstablishmentOption, console_actor, establishment_id_of
from postier.core.service import Postier
from postier.i18n import N_, system_language, translate


@dkim_app.command("generate")
def dkim_generate(
    domain: Annotated[str, typer.Argument(help=N_("An allowed domain, e.g. ac-lyon.fr"))],
    selector: Annotated[str, typer.Option(help=N_("DNS selector"))] = "postier",
    establishment: EstablishmentOption = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Make the DKIM key of a domain and print the DNS TXT record to publish."""

    async def action(core: Postier) -> Any:
        return await core.dkim_generate(await console_actor(core, establishment), domain,
                                        selector)

    key = _run(_config(data_dir, database_url), action)
    err.print(translate(system_language(), N_(
        "E-mails from {domain} are signed from now on. Publish this TXT record in the "
        "domain's DNS so that receivers can check the signatures:"), domain=key.domain),
              highlight=False)
    out.print(zone_line(key), highlight=False, soft_wrap=True)


@dkim_app.command("list")
def dkim_list(establishment: EstablishmentOption = None, data_dir: DataDir = None,
              database_url: DatabaseUrl = None) -> None:
    """The domains e-mails are signed for, with their DNS records."""

    async def action(core: Postier) -> Any:
        return await core.dkim_keys(await establishment_id_of(core, establishment))

    for key in _run(_config(data_dir, database_url), action).values():
        out.print(zone_line(key), highlight=False, soft_wrap=True)


@dkim_app.command("remove")
def dkim_remove(
    domain: Annotated[str, typer.Argument(help=N_("The domain to stop signing for"))],
    establishment: EstablishmentOption = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Stop signing e-mails of a domain and delete its key."""

    async def action(core: Postier) -> Any:
        return await core.dkim_remove(await console_actor(core, establishment), domain)

    removed = _run(_config(data_dir, database_url), action)
    err.print(translate(system_language(), N_(
        "E-mails from {domain} are no longer signed. Its DNS record can be removed once the "
        "e-mails already sent no longer need checking (a few days)."), domain=removed),
              highlight=False)


def zone_line(key: Any) -> str:
    """The record as a zone file line: TXT strings hold 255 characters at most, so a
    2048-bit key is written as several strings that resolvers join again."""
    value = key.record_value
    parts = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{key.record_name}. IN TXT {parts}"
