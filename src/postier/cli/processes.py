"""Commands that run the server's processes: ``postier serve``, ``postier worker`` and the
hidden ``postier http-process`` (a child of ``serve --http-processes``).

They import :mod:`postier.server.processes` (the web server, the SMTP doors, delivery) only
when they run: the workstation's commands, in the same program, start without them.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from postier.cli.common import DatabaseUrl, DataDir, _config, _fail, app, fail_with
from postier.errors import PostierError
from postier.i18n import N_, system_language, translate
from postier.server.config import ServerConfig


@app.command()
def serve(
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    http: Annotated[
        str | None, typer.Option(help=N_("HOST:PORT for the HTTP API (default 127.0.0.1:8025)"))
    ] = None,
    no_delivery: Annotated[
        bool, typer.Option("--no-delivery",
                           help=N_("Accept e-mails only; another process delivers"))
    ] = False,
    delivery_processes: Annotated[int | None, typer.Option(
        help=N_("Deliver in N child processes (0: in this one). Default: 1 with two cores "
        "or more, else 0"))
    ] = None,
    http_processes: Annotated[int | None, typer.Option(
        help=N_("Answer the HTTP API and web pages in N processes sharing the port (default 1)"))
    ] = None,
    smtp: Annotated[str | None, typer.Option(
        help=N_("HOST:PORT for SMTP submission with STARTTLS (default 127.0.0.1:2587), or off"))
    ] = None,
    smtps: Annotated[str | None, typer.Option(
        help=N_("HOST:PORT for SMTP submission with implicit TLS (default off)"))] = None,
    bounce_smtp: Annotated[str | None, typer.Option(
        help=N_("HOST:PORT where bounces come back by SMTP (default off)"))] = None,
    tls_cert: Annotated[Path | None, typer.Option(help=N_("Certificate (PEM) for SMTP"))] = None,
    tls_key: Annotated[Path | None, typer.Option(help=N_("Its private key (PEM)"))] = None,
    smtp_trusted_networks: Annotated[list[str] | None, typer.Option(
        help=N_("Networks (CIDR) that may submit without AUTH, e.g. 127.0.0.0/8"))] = None,
    smtp_trusted_account: Annotated[str | None, typer.Option(
        help=N_("The account trusted networks submit for"))] = None,
    log_level: Annotated[str, typer.Option(help=N_("DEBUG, INFO, WARNING"))] = "INFO",
) -> None:
    """Start the server: the HTTP API, SMTP submission and the delivery workers."""
    # The server's processes load here only: the other commands start without them.
    from postier.server import processes as server

    extra: dict[str, Any] = {
        "http": http, "smtp": smtp, "smtps": smtps, "tls_cert": tls_cert, "tls_key": tls_key,
        "bounce_smtp": bounce_smtp,
        "smtp_trusted_networks": ",".join(smtp_trusted_networks)
        if smtp_trusted_networks else None,
        "smtp_trusted_account": smtp_trusted_account,
        "delivery_processes": delivery_processes,
        "http_processes": http_processes,
    }
    if no_delivery:
        extra["delivery"] = False
    config = _config(data_dir, database_url, **extra)
    server.setup_logging(log_level)
    try:
        server.run(config, log_level)
    except PostierError as exc:
        fail_with(exc)
    except KeyboardInterrupt:
        pass


@app.command()
def worker(
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    log_level: Annotated[str, typer.Option(help=N_("DEBUG, INFO, WARNING"))] = "INFO",
    wake_fd: Annotated[int | None, typer.Option(hidden=True)] = None,
    worker_id: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run delivery only (several workers share a PostgreSQL queue; with the embedded
    SQLite store, `postier serve` already delivers)."""
    # The server's processes load here only: the other commands start without them.
    from postier.server import processes as server

    config = _config(data_dir, database_url)
    # A child of `postier serve --delivery-processes` (wake_fd) shares its parent's store,
    # whose data-dir lock the parent holds.
    if wake_fd is None and not (config.database_url or "").startswith(("postgres", "postgresql")):
        lang = system_language()
        _fail(translate(lang, N_("postier worker needs a shared PostgreSQL queue "
                                 "(--database-url postgresql://...).")),
              translate(lang, N_("With the embedded store, postier serve delivers itself.")))
    server.setup_logging(log_level)
    try:
        server.use_fast_loop()
        asyncio.run(server.run_worker(config, wake_fd=wake_fd, worker_id=worker_id))
    except PostierError as exc:
        fail_with(exc)
    except KeyboardInterrupt:
        pass


@app.command("http-process", hidden=True)
def http_process(
    listen_fd: Annotated[int, typer.Option()],
    control_fd: Annotated[int, typer.Option()],
    index: Annotated[int, typer.Option()],
    log_level: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """One of the HTTP processes of `postier serve --http-processes`; its configuration
    comes on standard input, as the parent resolved it."""
    # The server's processes load here only: the other commands start without them.
    from postier.server import processes as server

    config = ServerConfig.model_validate_json(sys.stdin.buffer.read())
    # SIGINT is the server's to answer (it stops its children after their requests).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server.setup_logging(log_level)
    try:
        server.use_fast_loop()
        asyncio.run(server.run_http_process(config, listen_fd=listen_fd,
                                            control_fd=control_fd, index=index))
    except PostierError as exc:
        fail_with(exc)
    except KeyboardInterrupt:
        pass
