"""The ``postier`` command: run the server, administer it, and send from a workstation.

Errors are printed in the terminal's language (``LANG``) with what to do about them.
"""

from __future__ import annotations

from postier.cli import (  # noqa: F401 - they register their commands
    account,  # account verify-sender, confirm, senders
    admin,
    alerts,  # alerts list
    operations,  # doctor, purge
    workstation,
)
from postier.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
