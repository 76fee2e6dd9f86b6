"""``postier account``: the workstation user's own account on the Postier server — here,
verifying a sender address with the code e-mailed to it (see
:mod:`postier.sender_verification`). They use the server set in ``postier config``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from postier import workstation
from postier.cli.common import app, fail_with, out
from postier.client import client_for
from postier.errors import PostierError

account_app = typer.Typer(help="Your account on the Postier server.", no_args_is_help=True)
app.add_typer(account_app, name="account")


@account_app.command("verify-sender")
def verify_sender(
    address: Annotated[str, typer.Argument(help="Your address, or one granted to you")],
) -> None:
    """E-mail a 6-digit code to ADDRESS; then run `postier account confirm ADDRESS CODE`."""
    try:
        with client_for(workstation.load()) as c:
            state = c.verify_sender(address)
    except PostierError as exc:
        fail_with(exc)
    if state["status"] == "verified":
        out.print(f"{state['address']} is already verified.", highlight=False)
    else:
        out.print(f"A code was sent to {state['address']} (valid until "
                  f"{state['code_expires_at']}): postier account confirm "
                  f"{state['address']} CODE", highlight=False)


@account_app.command("confirm")
def confirm(
    address: Annotated[str, typer.Argument(help="The address the code was sent to")],
    code: Annotated[str, typer.Argument(help="The 6 digits of the e-mail")],
) -> None:
    """Give the code received: ADDRESS is then verified."""
    try:
        with client_for(workstation.load()) as c:
            state = c.confirm_sender(address, code)
    except PostierError as exc:
        fail_with(exc)
    out.print(f"{state['address']} is verified.", highlight=False)


@account_app.command("senders")
def senders() -> None:
    """Your verified sender addresses and those waiting for their code."""
    try:
        with client_for(workstation.load()) as c:
            rows = c.sender_addresses()
    except PostierError as exc:
        fail_with(exc)
    table = Table("address", "status", "verified at", "code valid until")
    for r in rows:
        table.add_row(r["address"], r["status"], r["verified_at"] or "",
                      r["code_expires_at"] or "")
    out.print(table)
