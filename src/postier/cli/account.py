"""``postier account``: the workstation user's own account on the Postier server — here,
verifying a sender address with the code e-mailed to it (see
:mod:`postier.core.sender_verification`). They use the server set in ``postier config``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from postier.cli.common import app, fail_with, heading, out, when
from postier.errors import PostierError
from postier.i18n import N_, system_language, translate
from postier.workstation import settings_file as workstation
from postier.workstation.client import client_for

account_app = typer.Typer(help=N_("Your account on the Postier server."), no_args_is_help=True)
app.add_typer(account_app, name="account")


@account_app.command("verify-sender")
def verify_sender(
    address: Annotated[str, typer.Argument(help=N_("Your address, or one granted to you"))],
) -> None:
    """E-mail a 6-digit code to ADDRESS; then run `postier account confirm ADDRESS CODE`."""
    try:
        with client_for(workstation.load()) as c:
            state = c.verify_sender(address)
    except PostierError as exc:
        fail_with(exc)
    lang = system_language()
    if state["status"] == "verified":
        out.print(translate(lang, N_("{address} is already verified."),
                            address=state["address"]), highlight=False)
    else:
        out.print(translate(lang, N_("A code was sent to {address} (valid until {until}): "
                                     "postier account confirm {address} CODE"),
                            address=state["address"],
                            until=when(state["code_expires_at"], lang)), highlight=False)


@account_app.command("confirm")
def confirm(
    address: Annotated[str, typer.Argument(help=N_("The address the code was sent to"))],
    code: Annotated[str, typer.Argument(help=N_("The 6 digits of the e-mail"))],
) -> None:
    """Give the code received: ADDRESS is then verified."""
    try:
        with client_for(workstation.load()) as c:
            state = c.confirm_sender(address, code)
    except PostierError as exc:
        fail_with(exc)
    out.print(translate(system_language(), N_("{address} is verified."),
                        address=state["address"]), highlight=False)


@account_app.command("senders")
def senders() -> None:
    """Your verified sender addresses and those waiting for their code."""
    try:
        with client_for(workstation.load()) as c:
            rows = c.sender_addresses()
    except PostierError as exc:
        fail_with(exc)
    lang = system_language()
    table = Table(*heading(lang, N_("Address"), N_("State"), N_("Verified on"),
                           N_("Code valid until")))
    states = {"verified": N_("verified"), "pending": N_("waiting for its code"),
              "expired": N_("code expired"), "locked": N_("locked (too many wrong codes)")}
    for r in rows:
        table.add_row(r["address"], translate(lang, states.get(r["status"], r["status"])),
                      when(r["verified_at"], lang), when(r["code_expires_at"], lang))
    out.print(table)
