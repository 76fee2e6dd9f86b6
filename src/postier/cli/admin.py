"""Commands for the server side: run it, and administer the establishment from its console.

They work on the same data as the server (``--data-dir`` or ``POSTIER_DATA_DIR``,
``--database-url`` or ``POSTIER_DATABASE_URL``), also while it runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.table import Table

from postier.cli.common import (
    CONSOLE,
    DatabaseUrl,
    DataDir,
    T,
    _config,
    _fail,
    _run,
    app,
    dkim_app,
    err,
    establishments_app,
    fail_with,
    heading,
    out,
    profiles_app,
    settings_app,
    tokens_app,
    users_app,
    yes_no,
)
from postier.cli.language import pydantic_problems
from postier.core import accounts
from postier.core.service import Postier
from postier.delivery.diagnose import STEP_LABELS
from postier.errors import NotFound, PostierError
from postier.i18n import N_, system_language, translate
from postier.server.config import ServerConfig
from postier.store.base import User


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
    tls_cert: Annotated[Path | None, typer.Option(help=N_("Certificate (PEM) for SMTP"))] = None,
    tls_key: Annotated[Path | None, typer.Option(help=N_("Its private key (PEM)"))] = None,
    smtp_trusted_networks: Annotated[list[str] | None, typer.Option(
        help=N_("Networks (CIDR) that may submit without AUTH, e.g. 127.0.0.0/8"))] = None,
    smtp_trusted_account: Annotated[str | None, typer.Option(
        help=N_("The account trusted networks submit for"))] = None,
    log_level: Annotated[str, typer.Option(help=N_("DEBUG, INFO, WARNING"))] = "INFO",
) -> None:
    """Start the server: the HTTP API, SMTP submission and the delivery workers."""
    from postier.server import processes as server

    extra: dict[str, Any] = {
        "http": http, "smtp": smtp, "smtps": smtps, "tls_cert": tls_cert, "tls_key": tls_key,
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


async def _member(core: Postier, login: str, establishment: str | None) -> User:
    """A user named at the console: a username or an e-mail address of the establishment
    given (--establishment, else the first one), or ``slug:username`` for another's. The
    same name in another establishment never changes whom it finds."""
    if ":" in login:
        found = await core.login_candidates(login)
    else:
        est_id = await _establishment_id(core, establishment)
        named = [u for u in await core.login_candidates(login) if u.establishment_id == est_id]
        found = [u for u in named if u.username == login.strip()] or named
    if len(found) != 1:
        raise NotFound(N_("There is no user named {username} in this establishment."),
                       hint=N_("Name the establishment with --establishment, or write "
                               "slug:username."), username=login)
    return found[0]


Establishment = Annotated[str | None, typer.Option(
    "--establishment", help=N_("Short name of the establishment (default: the first one)"))]


async def _establishment_id(core: Postier, slug: str | None) -> int:
    if not slug:
        return 1
    est = await core.establishment(slug)
    if est is None:
        raise NotFound(N_("There is no establishment {slug} for you."), slug=slug)
    return est.id


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
        table.add_row(e.slug, e.name, yes_no(e.hosted, lang), _state(e.disabled, lang))
    out.print(table)


@establishments_app.command("disable")
def establishments_disable(
    slug: str, data_dir: DataDir = None, database_url: DatabaseUrl = None
) -> None:
    """Disable an establishment: its users can no longer sign in or send."""

    async def action(core: Postier) -> None:
        await core.store.update_establishment(await _establishment_id(core, slug),
                                              disabled=True)

    _run(_config(data_dir, database_url), action)
    out.print(translate(system_language(), N_("Establishment {slug} disabled."), slug=slug),
              highlight=False)


async def _console_actor(core: Postier, establishment: str | None) -> User:
    """The console, acting as an administrator of ``establishment`` (the first if None)."""
    return dataclasses.replace(CONSOLE,
                               establishment_id=await _establishment_id(core, establishment))


@dkim_app.command("generate")
def dkim_generate(
    domain: Annotated[str, typer.Argument(help=N_("An allowed domain, e.g. ac-lyon.fr"))],
    selector: Annotated[str, typer.Option(help=N_("DNS selector"))] = "postier",
    establishment: Establishment = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Make the DKIM key of a domain and print the DNS TXT record to publish."""

    async def action(core: Postier) -> Any:
        return await core.dkim_generate(await _console_actor(core, establishment), domain,
                                        selector)

    key = _run(_config(data_dir, database_url), action)
    err.print(translate(system_language(), N_(
        "E-mails from {domain} are signed from now on. Publish this TXT record in the "
        "domain's DNS so that receivers can check the signatures:"), domain=key.domain),
              highlight=False)
    out.print(zone_line(key), highlight=False, soft_wrap=True)


@dkim_app.command("list")
def dkim_list(establishment: Establishment = None, data_dir: DataDir = None,
              database_url: DatabaseUrl = None) -> None:
    """The domains e-mails are signed for, with their DNS records."""

    async def action(core: Postier) -> Any:
        return await core.dkim_keys(await _establishment_id(core, establishment))

    for key in _run(_config(data_dir, database_url), action).values():
        out.print(zone_line(key), highlight=False, soft_wrap=True)


@dkim_app.command("remove")
def dkim_remove(
    domain: Annotated[str, typer.Argument(help=N_("The domain to stop signing for"))],
    establishment: Establishment = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Stop signing e-mails of a domain and delete its key."""

    async def action(core: Postier) -> Any:
        return await core.dkim_remove(await _console_actor(core, establishment), domain)

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
    import asyncio

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
    import asyncio
    import signal

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


@users_app.command("add")
def users_add(
    username: str,
    email: Annotated[str, typer.Option("--email", help=N_("The user's e-mail address"))],
    name: Annotated[str, typer.Option("--name", help=N_("Display name"))] = "",
    role: Annotated[str, typer.Option("--role", help=N_("admin, user or operator"))] = "user",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help=N_("Read the password from standard input"))
    ] = False,
    establishment: Establishment = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a user of the establishment (an operator serves every establishment)."""
    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    if password_stdin and not password:
        lang = system_language()
        _fail(translate(lang, N_("No password on standard input.")),
              translate(lang, N_("Example: echo 'secret' | postier users add ...")))

    async def action(core: Postier) -> Any:
        est_id = await _establishment_id(core, establishment)
        return await core.add_user(username, email, display_name=name, role=role,
                                   password=password, establishment_id=est_id)

    user = _run(_config(data_dir, database_url), action)
    out.print(translate(system_language(), N_("User {username} <{email}> created ({role})."),
                        username=user.username, email=user.email, role=user.role),
              highlight=False)


PASSWORD_PROMPT = N_("New password for {username}: ")
PASSWORD_AGAIN = N_("The same password again: ")
PASSWORD_SHORT = N_("A password has at least 8 characters.")
PASSWORD_DIFFERENT = N_("The two passwords are different.")
PASSWORD_SET = N_("The password of {username} is set: they can sign in to the web pages.")


def _new_password(username: str, from_stdin: bool, lang: str) -> str:
    """The password typed twice at a terminal (hidden), or read from standard input."""
    if from_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(translate(lang, PASSWORD_PROMPT, username=username))
        if getpass.getpass(translate(lang, PASSWORD_AGAIN)) != password:
            _fail(translate(lang, PASSWORD_DIFFERENT))
    if len(password) < 8:
        _fail(translate(lang, PASSWORD_SHORT),
              translate(lang, N_("Example: echo 'a long passphrase' | postier users "
                                 "set-password {username} --password-stdin"),
                        username=username))
    return password


@users_app.command("set-password")
def users_set_password(
    username: Annotated[str, typer.Argument(help=N_("Username or e-mail address"))],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help=N_("Read the password from standard input"))
    ] = False,
    establishment: Establishment = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Set a user's password (asked twice, hidden); their open sessions end."""
    lang = system_language()
    password = _new_password(username, password_stdin, lang)

    async def action(core: Postier) -> User:
        user = await _member(core, username, establishment)
        digest = await asyncio.to_thread(accounts.hash_password, password)
        await core.store.update_user(user.id, password_hash=digest)
        core.forget_tokens()
        await core.store.audit(user.establishment_id, CONSOLE.username, "user.password",
                               user.username, {})
        return user

    user = _run(_config(data_dir, database_url), action)
    out.print(translate(lang, PASSWORD_SET, username=user.username), highlight=False)


@users_app.command("list")
def users_list(establishment: Establishment = None, data_dir: DataDir = None,
               database_url: DatabaseUrl = None) -> None:
    """List the users of the establishment."""

    async def action(core: Postier) -> Any:
        return await core.store.list_users(await _establishment_id(core, establishment))

    users = _run(_config(data_dir, database_url), action)
    lang = system_language()
    table = Table(*heading(lang, N_("Username"), N_("E-mail address"), N_("Name"), N_("Role"),
                           N_("State")))
    for u in users:
        table.add_row(u.username, u.email, u.display_name, u.role, _state(u.disabled, lang))
    out.print(table)


@tokens_app.command("create")
def tokens_create(
    username: str,
    name: Annotated[str, typer.Option("--name", help=N_("What the token is for"))] = "",
    establishment: Establishment = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create an API token for a user; the token is printed once, as the last line."""

    async def action(core: Postier) -> str:
        user = await _member(core, username, establishment)
        token, _ = await core.create_token(user, name)
        return token

    token = _run(_config(data_dir, database_url), action)
    err.print(translate(system_language(), N_("API token for {username} (shown only once; "
                                              "keep it secret):"), username=username),
              highlight=False)
    print(token)


@tokens_app.command("list")
def tokens_list(
    username: str, establishment: Establishment = None, data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """List a user's tokens (never their values)."""

    async def action(core: Postier) -> list[Any]:
        return await core.store.list_tokens((await _member(core, username, establishment)).id)

    lang = system_language()
    table = Table(*heading(lang, N_("Id"), N_("Name"), N_("State")))
    for t in _run(_config(data_dir, database_url), action):
        state = N_("revoked") if t.revoked_at else N_("active")
        table.add_row(str(t.id), t.name, translate(lang, state))
    out.print(table)


def _state(disabled: bool, lang: str) -> str:
    return translate(lang, N_("disabled") if disabled else N_("active"))


def _flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"relay": {"port": 25}}`` as ``{"relay.port": 25}``."""
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value: Any, lang: str) -> str:
    if isinstance(value, bool):
        return yes_no(value, lang)
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(x) for x in value)
    return str(value)


def print_changes(before: dict[str, Any], after: dict[str, Any], lang: str) -> None:
    """What a change of the settings changed, one line a setting (« relay.port : 25 → 587 »),
    then the warnings of the settings as saved."""
    old, new = _flat(before), _flat(after)
    changed = [k for k in new if k not in ("warnings", "hosted") and old.get(k) != new[k]]
    for key in changed:
        out.print(translate(lang, N_("{key}: {old} → {new}"), key=key,
                            old=_shown(old.get(key), lang), new=_shown(new[key], lang)),
                  highlight=False)
    if not changed:
        out.print(translate(lang, N_("Nothing changed.")), highlight=False)
    for warning in after.get("warnings") or []:
        err.print(f"⚠ {warning}", highlight=False)


def _parse_value(key: str, raw: str) -> Any:
    if key == "allowed_domains":
        return [d.strip() for d in raw.replace(",", " ").split() if d.strip()]
    if raw.lower() in ("true", "false", "yes", "no", "on", "off"):
        return raw.lower() in ("true", "yes", "on")
    if raw.isdigit():
        return int(raw)
    return raw


@settings_app.command("show")
def settings_show(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Show the settings (the relay password only as password_set)."""
    doc = _run(_config(data_dir, database_url), lambda core: core.get_settings(CONSOLE))
    out.print_json(json.dumps(doc, ensure_ascii=False))


@settings_app.command("set")
def settings_set(
    key: Annotated[str, typer.Argument(help=N_("Dotted key, e.g. relay.host, sender.address, "
                                            "allowed_domains, delegation, retry.max_age"))],
    value: Annotated[str, typer.Argument(
        help=N_("The value; allowed_domains: comma-separated; - reads it from standard input "
        "(for relay.password, so it stays out of the shell history)"))],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Change one setting; the whole settings are validated before anything is saved."""
    if value == "-":
        value = sys.stdin.readline().rstrip("\r\n")
    lang = system_language()

    async def action(core: Postier) -> tuple[dict[str, Any], dict[str, Any]]:
        before = await core.get_settings(CONSOLE, lang)
        current = (await core.stored_settings(1)).model_dump(mode="json")
        section, _, leaf = key.partition(".")
        if section not in current or (leaf and not isinstance(current[section], dict)) or (
            leaf and leaf not in current[section]
        ):
            names = [
                f"{sec}.{k}" for sec, sub in current.items() if isinstance(sub, dict)
                for k in sub
            ] + [sec for sec, sub in current.items() if not isinstance(sub, dict)]
            _fail(translate(lang, N_("Unknown setting {key!r}."), key=key),
                  translate(lang, N_("Settings: {names}"), names=", ".join(sorted(names))))
        if leaf:
            current[section][leaf] = _parse_value(leaf, value)
            payload = {section: current[section]}
        else:
            payload = {section: _parse_value(section, value)}
        return before, await core.put_settings(CONSOLE, payload, lang)

    try:
        before, after = _run(_config(data_dir, database_url), action)
    except ValidationError as exc:
        _fail(pydantic_problems(exc, lang))
    print_changes(before, after, lang)


@settings_app.command("oauth2-certificate")
def settings_oauth2_certificate(
    certificate: Annotated[Path, typer.Argument(
        help=N_("The certificate registered for the application in Entra ID (PEM file)"),
        exists=True, dir_okay=False, readable=True)],
    private_key: Annotated[Path, typer.Argument(
        help=N_("Its private key (PEM file, not encrypted)"), exists=True, dir_okay=False,
        readable=True)],
    backup: Annotated[bool, typer.Option("--backup", help=N_("For the backup relay"))] = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """OAuth2 with a certificate (Microsoft 365): store the certificate and its private
    key, checked together, encrypted at rest and never shown again. Then set
    relay.auth to oauth2."""
    section = "backup_relay" if backup else "relay"
    lang = system_language()
    try:
        pems = {"oauth2_certificate": certificate.read_text(),
                "oauth2_private_key": private_key.read_text()}
    except (OSError, UnicodeDecodeError) as exc:
        _fail(translate(lang, N_("Cannot read the PEM files: {error}."), error=exc),
              translate(lang, N_("Give the certificate and the key as text files "
                                 "(-----BEGIN …).")))

    async def action(core: Postier) -> tuple[dict[str, Any], dict[str, Any]]:
        before = await core.get_settings(CONSOLE, lang)
        current = (await core.stored_settings(1)).model_dump(mode="json")
        if current.get(section) is None:
            _fail(translate(lang, N_("There is no backup relay yet.")),
                  translate(lang, N_("Add it first, on the settings page or with PUT "
                                     "/api/v1/settings.")))
        return before, await core.put_settings(CONSOLE, {section: {**current[section], **pems}},
                                               lang)

    try:
        before, after = _run(_config(data_dir, database_url), action)
    except ValidationError as exc:
        _fail(pydantic_problems(exc, lang, prefix=section, strip=(section,)))
    print_changes(before, after, lang)


@settings_app.command("preset")
def settings_preset(
    name: Annotated[str, typer.Argument(
        help=N_("microsoft365, google-workspace, google-relay or academy"))],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Fill the SMTP server settings from a preset (username and password are kept)."""
    from postier.core.presets import PRESETS

    lang = system_language()
    if name not in PRESETS:
        _fail(translate(lang, N_("Unknown preset {name!r}."), name=name),
              translate(lang, N_("Presets: {names}"), names=", ".join(PRESETS)))
    relay = {k: v for k, v in PRESETS[name]["relay"].items() if v != "" or k != "host"}

    async def action(core: Postier) -> tuple[dict[str, Any], dict[str, Any]]:
        before = await core.get_settings(CONSOLE, lang)
        return before, await core.put_settings(CONSOLE, {"relay": relay}, lang)

    print_changes(*_run(_config(data_dir, database_url), action), lang)


@settings_app.command("test")
def settings_test(
    to: Annotated[str, typer.Option("--to", help=N_("Who receives the test e-mail"))],
    check_senders: Annotated[
        bool, typer.Option("--check-senders", help=N_("Also check the policy's sender addresses"))
    ] = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Tester l'envoi d'e-mails: send a real test e-mail with the saved settings and
    report every step."""
    lang = system_language()
    report = _run(
        _config(data_dir, database_url),
        lambda core: core.admin.test_settings(CONSOLE, to, None, lang,
                                              check_senders=check_senders),
    )
    print_report(report.as_dict())
    if not report.ok:
        raise typer.Exit(1)


def print_report(report: dict[str, Any]) -> None:
    """Show a test-send report as a person reads it."""
    lang = system_language()
    table = Table("", *heading(lang, N_("Step"), N_("ms"), N_("Detail")))
    for s in report["steps"]:
        table.add_row("[green]✓[/]" if s["ok"] else "[red]✗[/]",
                      translate(lang, STEP_LABELS.get(s["step"], s["step"])), str(s["ms"]),
                      s["detail"])
    out.print(table)
    if report.get("error"):
        e = report["error"]
        err.print(f"[bold red]{e['message']}[/]", highlight=False)
        if e.get("hint"):
            err.print(e["hint"], highlight=False)
    else:
        out.print(f"[green]OK[/] ({report.get('latency_ms')} ms)", highlight=False)
        if report.get("suggestion"):
            out.print(report["suggestion"], highlight=False)
    for c in report.get("sender_checks") or []:
        mark = "[green]✓[/]" if c["ok"] else "[red]✗[/]"
        out.print(f"{mark} MAIL FROM:<{c['address']}> {c.get('code') or ''} {c.get('reply') or ''}",
                  highlight=False)


ProfileOpt = Annotated[str | None, typer.Option(help=N_("SMTP server host"))]


def _profile_payload(
    label: str, host: str | None, port: int | None, security: str | None, auth: str | None,
    username: str | None, password_stdin: bool, timeout: int | None,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {k: v for k, v in (base or {}).items()
                               if k not in ("id", "password_set")}
    payload["label"] = label
    for k, v in (("host", host), ("port", port), ("security", security), ("auth", auth),
                 ("username", username), ("timeout", timeout)):
        if v is not None:
            payload[k] = v
    payload["password"] = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    return payload


@profiles_app.command("list")
def profiles_list(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """List the establishment's sending profiles (no password shown): from the server's
    data (--data-dir) at its console, or through the server from a workstation."""
    if data_dir is None and database_url is None:
        from postier.cli.workstation import list_server_profiles

        list_server_profiles()
        return
    rows = _run(_config(data_dir, database_url), lambda core: core.admin.list_profiles(CONSOLE))
    lang = system_language()
    table = Table(*heading(lang, N_("Id"), N_("Label"), N_("Server"), N_("Security"),
                           N_("Sign-in"), N_("Username"), N_("Password")))
    for p in rows:
        table.add_row(str(p["id"]), p["label"], f"{p['host']}:{p['port']}", p["security"],
                      p["auth"], p["username"],
                      translate(lang, N_("stored")) if p["password_set"] else "-")
    out.print(table)


@profiles_app.command("add")
def profiles_add(
    label: str,
    host: Annotated[str, typer.Option(help=N_("SMTP server host"))],
    port: Annotated[int, typer.Option(help=N_("SMTP port"))] = 587,
    security: Annotated[str, typer.Option(help=N_("none, starttls or tls"))] = "starttls",
    auth: Annotated[str, typer.Option(help=N_("none or password"))] = "none",
    username: Annotated[str, typer.Option(help=N_("Shared username (optional)"))] = "",
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help=N_("Read a shared password from stdin"))] = False,
    timeout: Annotated[int, typer.Option(help=N_("Server timeout in seconds"))] = 30,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a sending profile."""
    payload = _profile_payload(label, host, port, security, auth, username, password_stdin,
                               timeout)
    p = _run_validated(_config(data_dir, database_url),
                       lambda core: core.admin.create_profile(CONSOLE, payload))
    out.print(translate(system_language(), N_("Profile {id} {label!r} created."),
                        id=p["id"], label=p["label"]), highlight=False)


@profiles_app.command("edit")
def profiles_edit(
    label: str,
    new_label: Annotated[str | None, typer.Option(help=N_("Rename the profile"))] = None,
    host: ProfileOpt = None,
    port: Annotated[int | None, typer.Option(help=N_("SMTP port"))] = None,
    security: Annotated[str | None, typer.Option(help=N_("none, starttls or tls"))] = None,
    auth: Annotated[str | None, typer.Option(help=N_("none or password"))] = None,
    username: Annotated[str | None, typer.Option(help=N_("Shared username"))] = None,
    password_stdin: Annotated[bool, typer.Option("--password-stdin",
                                                 help=N_("Read a new shared password"))] = False,
    timeout: Annotated[int | None, typer.Option(help=N_("Server timeout in seconds"))] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Change a sending profile (options not given stay as they are)."""

    async def action(core: Postier) -> dict[str, Any]:
        current = await _find_profile(core, label)
        payload = _profile_payload(new_label or label, host, port, security, auth, username,
                                   password_stdin, timeout, base=current)
        return await core.admin.update_profile(CONSOLE, current["id"], payload)

    p = _run_validated(_config(data_dir, database_url), action)
    out.print(translate(system_language(), N_("Profile {label!r} updated."),
                        label=p["label"]), highlight=False)


@profiles_app.command("remove")
def profiles_remove(label: str, data_dir: DataDir = None,
                    database_url: DatabaseUrl = None) -> None:
    """Delete a sending profile."""

    async def action(core: Postier) -> None:
        await core.admin.delete_profile(CONSOLE, (await _find_profile(core, label))["id"])

    _run(_config(data_dir, database_url), action)
    out.print(translate(system_language(), N_("Profile {label!r} removed."), label=label),
              highlight=False)


async def _find_profile(core: Postier, label: str) -> dict[str, Any]:
    for p in await core.admin.list_profiles(CONSOLE):
        if p["label"] == label or str(p["id"]) == label:
            return p
    from postier.errors import NotFound

    raise NotFound(N_("There is no sending profile {id}."), id=label)


def _run_validated(config: ServerConfig, action: Callable[[Postier], Awaitable[T]]) -> T:
    try:
        return _run(config, action)
    except ValidationError as exc:
        _fail(pydantic_problems(exc, system_language()))
