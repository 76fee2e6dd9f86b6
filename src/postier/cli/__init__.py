"""The ``postier`` command: run the server, administer it, and send from a workstation.

Errors are printed in the terminal's language (``LANG``) with what to do about them.
"""

from __future__ import annotations

# The help lists commands in the order they register, that is the order of these imports.
# isort: off
from postier.cli import (  # noqa: F401 - they register their commands
    account,  # account verify-sender, confirm, senders
    processes,  # serve, worker, http-process
    establishments,
    dkim,
    users,  # users, tokens
    settings,
    profiles,
    alerts,  # alerts list
    operations,  # doctor, purge, domains
    workstation,  # config, send, status, test, outbox
)
# isort: on
from postier.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
