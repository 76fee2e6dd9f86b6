"""Commands of a workstation: its sending settings, sending, following, the local outbox.

They follow the workstation's settings file (``postier config show``): through the
Postier server (``server`` mode) or directly with the user's own or a profile's SMTP
server (``own`` / ``profile`` modes). Exit status: 0 when the e-mail is sent or queued,
75 (try again later) when it is kept in the outbox, 1 otherwise.

E-mails kept in the outbox leave by themselves: a quick, bounded hand-over to the server
before each workstation command, and ``postier outbox watch`` (a loop for a service).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.table import Table
from rich.text import Text

from postier.cli.common import (
    _fail,
    app,
    err,
    fail_with,
    heading,
    out,
    outbox_app,
    status_word,
    when,
    workstation_config_app,
    workstation_settings,
)
from postier.cli.language import pydantic_problems
from postier.cli.settings import print_report
from postier.core.policy import normalize_address
from postier.core.reasons import explain_error
from postier.delivery import diagnose
from postier.errors import InvalidInput, PostierError
from postier.i18n import N_, system_language, translate
from postier.workstation import outbox
from postier.workstation import settings_file as workstation
from postier.workstation.client import SendResult, client_for
from postier.workstation.sending import send
from postier.workstation.settings_file import Mode

EX_TEMPFAIL = 75

# Workstation commands that first hand the outbox's kept e-mails to the server (quickly).
_HAND_OVER_BEFORE = frozenset({"send", "status", "test", "config", "profiles", "account"})

_KEPT = {
    "server": N_("The e-mail {id} is kept in this workstation's outbox: it goes to the "
                 "Postier server as soon as the server answers, at the next postier command "
                 "or with postier outbox watch (postier outbox flush tries at once)."),
    "smtp": N_("The e-mail {id} is kept in this workstation's outbox: postier outbox flush "
               "sends it when the mail server answers again (postier outbox watch does it "
               "by itself)."),
}
_HANDED = N_("The e-mail {kept} kept in this workstation's outbox was handed to the Postier "
             "server: {id}.")
_REFUSED = N_("The e-mail {id} kept in this workstation's outbox was refused: it will not be "
              "sent.")


@app.callback()
def _before_command(ctx: typer.Context) -> None:
    """Postier: outgoing e-mail for school software."""
    if ctx.invoked_subcommand in _HAND_OVER_BEFORE and outbox.exists():
        _hand_over_kept()


def _hand_over_kept() -> None:
    """E-mails kept for the server go first, in a few seconds at most; a server still away
    costs the command one short connection attempt."""
    lang = system_language()
    try:
        results = asyncio.run(outbox.hand_over(workstation.load(), lang=lang, quick=True))
    except (PostierError, OSError):
        return  # the command itself says what is wrong with the settings
    for r in results:
        if r.status != "kept":
            _report(r, lang)


def _report(result: SendResult, lang: str) -> None:
    """A kept e-mail that has just left (or been refused), on stderr: stdout stays the
    command's own answer."""
    if result.kept_as:
        err.print(translate(lang, _HANDED, kept=result.kept_as, id=result.id),
                  highlight=False)
        return
    _error(result, lang)
    if result.status == "failed" and result.via == "server":
        err.print(translate(lang, _REFUSED, id=result.id), highlight=False)


def _error(result: SendResult, lang: str) -> None:
    if result.error is not None:
        err.print(f"[bold red]{result.error.message(lang)}[/]", highlight=False)
        hint = result.error.hint(lang)
        if hint:
            err.print(hint, highlight=False)


@workstation_config_app.command("show")
def config_show() -> None:
    """Show this workstation's settings (secrets masked) and where they are kept."""
    s = workstation_settings()
    err.print(f"# {workstation.config_path()}", highlight=False)
    out.print_json(json.dumps(s.public(), ensure_ascii=False))


@workstation_config_app.command("set")
def config_set(
    key: Annotated[str, typer.Argument(help=N_("mode, server.url, server.token, identity.name, "
                                            "identity.address, smtp.host, smtp.port, ..."))],
    value: Annotated[str, typer.Argument(
        help=N_("The value (mode: server, own or profile); - reads it from standard input, "
        "for smtp.password and server.token"))],
) -> None:
    """Change one setting of this workstation; refused with the allowed values if wrong."""
    if value == "-":
        value = sys.stdin.readline().rstrip("\r\n")
    s = workstation_settings()
    try:
        s.set(key, value)
    except PostierError as exc:
        fail_with(exc)
    path = workstation.save(s)
    out.print(translate(system_language(), N_("{key} set ({path})."), key=key, path=path),
              highlight=False)


@workstation_config_app.command("import")
def config_import(
    file: Annotated[Path, typer.Argument(help=N_("A profile file (JSON) given by the server"))],
) -> None:
    """Use a sending profile saved from the web interface (mode becomes profile)."""
    lang = system_language()
    try:
        profile = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(profile, dict) or "host" not in profile:
            raise ValueError(translate(lang, N_("no SMTP server in this file")))
    except (OSError, ValueError) as exc:
        _fail(f"{file}: {exc}",
              translate(lang, N_("Give the profile file downloaded from the Postier server.")))
    try:
        s = workstation.apply_profile(workstation_settings(), profile)
    except PostierError as exc:
        fail_with(exc)
    workstation.save(s)
    out.print(translate(lang, N_("Profile {label!r} imported: this workstation now sends "
                                 "with it."), label=s.profile.label), highlight=False)


_OWN_KEYS = ("host", "port", "security", "auth", "username")


@workstation_config_app.command("own")
def config_own(
    host: Annotated[str | None, typer.Option(help=N_("Your SMTP server's address"))] = None,
    port: Annotated[int | None, typer.Option(help=N_("Its port (587, 465, 25)"))] = None,
    security: Annotated[str | None, typer.Option(help=N_("none, starttls or tls"))] = None,
    auth: Annotated[str | None, typer.Option(help=N_("none or password"))] = None,
    username: Annotated[str | None, typer.Option(help=N_("Your username"))] = None,
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help=N_("Read your password from standard input"))] = False,
    name: Annotated[str | None, typer.Option(help=N_("Your name as the sender"))] = None,
    address: Annotated[str | None, typer.Option(help=N_("Your sender address"))] = None,
) -> None:
    """Define my own parameters: this workstation sends directly through your own SMTP
    server (mode own). Settings not given are kept."""
    lang = system_language()
    s = workstation_settings()
    given = {f"smtp.{k}": v for k, v in zip(_OWN_KEYS, (host, port, security, auth, username),
                                              strict=True) if v is not None}
    given |= {k: v for k, v in (("identity.name", name), ("identity.address", address))
              if v is not None}
    if password_stdin:
        given["smtp.password"] = sys.stdin.readline().rstrip("\r\n")
    try:
        for key, value in {**given, "mode": "own"}.items():
            s.set(key, str(value))
    except PostierError as exc:
        fail_with(exc)
    workstation.save(s)
    out.print(translate(lang, N_("This workstation now sends with your own parameters, "
                                 "through {host}:{port}."), host=s.smtp.host or "-",
                        port=s.smtp.port), highlight=False)
    try:
        s.check_ready()
    except PostierError as exc:  # saved all the same: the rest may be set afterwards
        err.print(exc.message(lang), highlight=False)
        err.print(exc.hint(lang) or "", highlight=False)


def _show(result: SendResult, lang: str) -> None:
    if result.status in ("sent", "queued"):
        out.print(f"{status_word(result.status, lang)}: {result.id}", highlight=False)
        if result.kept_as:
            _report(result, lang)
        if result.sender_note:
            err.print(result.sender_note, highlight=False)
        for r in result.recipients:
            if r.status == "failed":
                err.print(f"{r.address}: {r.code} {r.reply}", highlight=False)
        return
    if result.status == "kept":
        out.print(f"{status_word('kept', lang)}: {result.id}", highlight=False)
        _error(result, lang)
        err.print(translate(lang, _KEPT[result.via], id=result.id), highlight=False)
    else:
        _report(result, lang)


@app.command("send")
def send_command(
    to: Annotated[list[str], typer.Option("--to", help=N_("Recipient (repeat for several)"))],
    subject: Annotated[str, typer.Option("--subject", help=N_("The subject"))] = "",
    text: Annotated[str | None, typer.Option("--text", help=N_("The text of the e-mail"))] = None,
    text_file: Annotated[Path | None, typer.Option(
        "--text-file", help=N_("A file holding the text of the e-mail"))] = None,
    html_file: Annotated[Path | None, typer.Option(
        "--html-file", help=N_("A file holding its HTML version"))] = None,
    attach: Annotated[list[Path] | None, typer.Option(
        "--attach", help=N_("File to attach"))] = None,
    cc: Annotated[list[str] | None, typer.Option(
        "--cc", help=N_("Copy to (repeat for several)"))] = None,
    bcc: Annotated[list[str] | None, typer.Option(
        "--bcc", help=N_("Hidden copy to (repeat for several)"))] = None,
    from_: Annotated[str | None, typer.Option("--from", help=N_("Sender, if allowed"))] = None,
) -> None:
    """Send an e-mail as this workstation is set up (server, own or profile)."""
    lang = system_language()
    if text is not None and text_file is not None:
        _fail(translate(lang, N_("Give --text or --text-file, not both.")))
    try:
        body = text_file.read_text(encoding="utf-8") if text_file else text
        html = html_file.read_text(encoding="utf-8") if html_file else None
        for f in attach or []:
            if not f.is_file():
                raise OSError(translate(lang, N_("{file}: no such file"), file=f))
    except OSError as exc:
        _fail(str(exc))
    try:
        result = send(to, subject, body, html, cc=cc or (), bcc=bcc or (),
                      attachments=list(attach or []), from_=from_, lang=lang)
    except PostierError as exc:
        fail_with(exc)
    except ValidationError as exc:  # pydantic validation of the message
        _fail(pydantic_problems(exc, lang))
    _show(result, lang)
    if result.status == "kept":
        raise typer.Exit(EX_TEMPFAIL)
    if result.status not in ("sent", "queued"):
        raise typer.Exit(1)


@app.command("status")
def status_command(
    message_id: Annotated[str, typer.Argument(help=N_("The e-mail's id, as send printed it"))],
    as_json: Annotated[bool, typer.Option("--json", help=N_("Print it as JSON, for a "
                                                            "program"))] = False,
) -> None:
    """What became of an e-mail (on the server, or in this workstation's outbox)."""
    s = workstation_settings()
    lang = system_language()
    doc: dict[str, Any]
    record = asyncio.run(outbox.get(message_id)) if outbox.exists() else None
    server_id = outbox.handed_as(record) if record is not None else None
    if s.mode == Mode.SERVER and (record is None or server_id):
        try:
            with client_for(s, lang) as c:
                doc = c.status(server_id or message_id).raw
        except PostierError as exc:
            fail_with(exc)
    else:
        if record is None:
            _fail(translate(lang, N_("There is no e-mail {id} in this workstation's outbox."),
                            id=message_id))
        # The API's view of an e-mail; its package (the web application) loads only here.
        from postier.server.api.views import message_view

        doc = message_view(record, lang, history=True)
    if as_json:
        out.print_json(json.dumps(doc, ensure_ascii=False))
    else:
        print_status(doc, lang)


def print_status(doc: dict[str, Any], lang: str) -> None:
    """An e-mail's state as a person reads it: a few labelled lines, its recipients and
    its delivery attempts."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    error = doc.get("last_error") or {}
    for label, value in (
        (N_("E-mail"), doc["id"]),
        (N_("State"), status_word(doc["status"], lang)),
        (N_("Subject"), doc.get("subject") or ""),
        (N_("Sender"), doc.get("sender") or ""),
        (N_("Submitted"), when(doc.get("created_at"), lang)),
        (N_("Attempts"), str(doc.get("attempts", 0))),
        (N_("Next attempt"), when(doc.get("next_attempt_at"), lang)),
        (N_("Last error"), " → ".join(x for x in (error.get("message"), error.get("hint"))
                                      if x)),
        (N_("Note"), doc.get("sender_note") or ""),
    ):
        if value:
            facts.add_row(translate(lang, label), Text(value))
    out.print(facts)
    recipients = Table(*heading(lang, N_("Recipient"), N_("State"), N_("Server's reply")))
    for r in doc.get("recipients") or []:
        reply = " ".join(str(x) for x in (r.get("code"), r.get("reply")) if x)
        recipients.add_row(r["address"], status_word(r["status"], lang), reply)
    out.print(recipients)
    if doc.get("history"):
        attempts = Table(*heading(lang, N_("Attempt"), N_("Server"), N_("Result"),
                                  N_("Detail")))
        for a in doc["history"]:
            attempts.add_row(when(a.get("at"), lang), a.get("relay") or "",
                             status_word(a.get("outcome") or "", lang),
                             " ".join(str(x) for x in (a.get("code"), a.get("detail")) if x))
        out.print(attempts)


@app.command("test")
def test_command(
    to: Annotated[str, typer.Option("--to", help=N_("Who receives the test e-mail"))],
) -> None:
    """Tester l'envoi d'e-mails for this workstation: a real test e-mail, step by step
    (own/profile), or a check of the server and of your account (server mode)."""
    s = workstation_settings()
    lang = system_language()
    if s.mode == Mode.SERVER:
        try:
            with client_for(s, lang) as c:
                me = c.me()
        except PostierError as exc:
            fail_with(exc)
        out.print(translate(lang, N_("The server {url} answers; you are {username} "
                                     "<{email}>."),
                            url=s.server.url, username=me["username"], email=me["email"]),
                  highlight=False)
        try:
            result = send([to], "Test Postier", "Test", settings=s, lang=lang)
        except PostierError as exc:
            fail_with(exc)
        _show(result, lang)
        return
    try:
        s.check_ready()
        address = normalize_address(to)
    except (PostierError, InvalidInput) as exc:
        fail_with(exc)
    report = asyncio.run(diagnose.test_send(
        s.smtp, to=address, sender_name=s.identity.name, sender_address=s.identity.address,
        lang=lang, label=s.profile.label if s.mode == Mode.PROFILE else "",
    ))
    print_report(report.as_dict())
    if not report.ok:
        raise typer.Exit(1)


@outbox_app.command("list")
def outbox_list() -> None:
    """E-mails of this workstation's direct sending, newest first, with their state."""
    lang = system_language()
    rows = asyncio.run(outbox.listing())
    table = Table(*heading(lang, N_("E-mail"), N_("Through"), N_("State"), N_("Subject"),
                           N_("Recipients"), N_("Last error")))
    # An id is copied into other commands: it is never cut, whatever the terminal's width.
    table.columns[0].no_wrap = True
    table.columns[0].min_width = max((len(m.id) for m in rows), default=0)
    for m in rows:
        e = explain_error(m.last_error, lang)
        to_server = m.establishment_id == outbox.TO_SERVER
        status = "handed over" if to_server and m.status == "sent" else m.status
        via = translate(lang, N_("Postier server")) if to_server else \
            translate(lang, N_("mail server"))
        table.add_row(m.id, via, status_word(status, lang), m.subject,
                      ", ".join(r.address for r in m.recipients), e["message"] if e else "")
    out.print(table)


@outbox_app.command("flush")
def outbox_flush() -> None:
    """Try again now every e-mail waiting in this workstation's outbox."""
    s = workstation_settings()
    lang = system_language()
    try:
        s.check_ready()
    except PostierError as exc:
        fail_with(exc)
    results = asyncio.run(outbox.flush(s, lang)) if outbox.exists() else []
    if not results:
        out.print(translate(lang, N_("The outbox is empty: nothing to send.")))
    for r in results:
        _show(r, lang)
    if any(r.status == "failed" for r in results):
        raise typer.Exit(1)
    if any(r.status == "kept" for r in results):
        raise typer.Exit(EX_TEMPFAIL)


@outbox_app.command("watch")
def outbox_watch(
    interval: Annotated[float, typer.Option(
        "--interval", min=0.1, help=N_("Seconds between two rounds"))] = 15.0,
) -> None:
    """Empty this workstation's outbox by itself, as soon as the server (or the mail
    server) answers: a loop for a workstation service or the host application; SIGINT or
    SIGTERM stops it after the round in progress."""
    lang = system_language()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await outbox.watch(interval=interval, stop=stop, lang=lang,
                           report=lambda r: _show(r, lang))

    err.print(translate(lang, N_("Watching this workstation's outbox every {interval} s "
                                 "(Ctrl-C stops)."), interval=f"{interval:g}"),
              highlight=False)
    asyncio.run(main())
