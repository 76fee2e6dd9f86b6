"""Reading bounces from an IMAP mailbox (``bounces.imap`` in the settings).

Where bounces cannot come back to Postier's own SMTP door, they land in an ordinary
mailbox, which the server looks at every ``interval`` seconds: each unread message is handed
to a handler (which reads the bounce) and only then marked as read. Nothing is deleted, so
a person can still open the mailbox and see every bounce. A message is marked once
handled, not before: if Postier stops in between, the message is handed again at the next
look (at least once, never lost), so the handler must accept the same bounce twice.

Every failure to reach the server, secure the connection, log in or open the folder
becomes a :class:`MailboxError` that says, in French or English, what failed and what to
change; the password never appears in it.
"""

from __future__ import annotations

import asyncio
import imaplib
import os
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from postier.core.settings import BounceMailbox, Security
from postier.errors import PostierError
from postier.i18n import N_

SEEN = b"\\Seen"
MAX_SIZE = 10 * 1024 * 1024  # bytes; a bounce is small, a larger message is not one


class MailboxError(PostierError):
    """The bounce mailbox could not be read. ``failure`` says what failed (a key of
    :data:`FAILURES`), ``step`` where in the conversation (connect, tls, login, select,
    search, fetch, store; empty before connecting), for programs and logs."""

    code = "bounce_mailbox"
    http_status = 502
    transient = True
    default_template = N_("The bounce mailbox cannot be read.")

    def __init__(self, template: str | None = None, *, failure: str = "unexpected",
                 step: str = "", **kwargs: Any) -> None:
        self.failure = failure
        self.step = step
        kwargs.setdefault("failure", failure)
        kwargs.setdefault("step", step)
        super().__init__(template, **kwargs)


@dataclass(frozen=True)
class MailboxRead:
    """What one look at the mailbox did."""

    read: int  # messages handed to the handler and marked as read
    skipped: int  # messages too large: marked as read without being fetched whole
    left: int  # unread messages still waiting (beyond the limit of one look)


@dataclass(frozen=True)
class Failure:
    """What a failure tells the administrator (English templates, translated when shown),
    and whether the next look may succeed without anyone changing anything."""

    message: str
    hint: str
    transient: bool


_PORTS_HINT = N_("Check that the security setting matches the port: TLS for 993, STARTTLS "
                 "for 143.")

FAILURES: dict[str, Failure] = {
    "not_configured": Failure(
        N_("No IMAP server is set for the bounce mailbox."),
        N_("Enter the IMAP server, username and password of the mailbox the bounces arrive "
           "in, or remove the mailbox from the bounce settings."), False),
    "no_password": Failure(
        N_("No password is set for the bounce mailbox {username}."),
        N_("Enter the mailbox's password in the bounce settings."), False),
    "dns": Failure(
        N_("The bounce mailbox cannot be reached: the IMAP server name {host} cannot be "
           "found."),
        N_("Check the server name (for example imap.ac-lyon.fr) and this computer's network "
           "connection."), True),
    "refused": Failure(
        N_("The bounce mailbox cannot be reached: nothing answers at {host}:{port} "
           "(connection refused)."),
        N_("Check the port (usually 993 for TLS, 143 for STARTTLS) and that the IMAP server "
           "is running."), True),
    "unreachable": Failure(
        N_("The bounce mailbox cannot be reached at {host}:{port} ({reason})."),
        N_("Check the server name and port, and this computer's network connection."), True),
    "timeout": Failure(
        N_("The IMAP server {host}:{port} did not answer within {timeout} s."),
        N_("Check the server name and port, and that no firewall stands between this "
           "computer and the IMAP server."), True),
    "tls_expected": Failure(
        N_("The IMAP server {host}:{port} did not answer within {timeout} s: port {port} "
           "expects TLS from the first byte."),
        N_("Choose TLS security for port 993, or STARTTLS on port 143."), True),
    "tls_certificate": Failure(
        N_("The TLS certificate of the IMAP server {host} is not trusted: {reason}."),
        N_("Check the server name (it must match the certificate). If the server's "
           "certificate comes from an internal authority, give that authority's certificate "
           "to Postier (POSTIER_CA_FILE); turn the certificate check off only on a trusted "
           "network."), True),
    "tls_unexpected": Failure(
        N_("The IMAP server {host}:{port} does not speak TLS from the first byte."),
        N_("Choose STARTTLS security for port 143, or TLS on port 993."), True),
    "tls_failed": Failure(
        N_("The TLS handshake with the IMAP server {host}:{port} failed: {reason}."),
        _PORTS_HINT, True),
    "starttls_unavailable": Failure(
        N_("The IMAP server {host}:{port} does not offer STARTTLS."),
        N_("Choose TLS security on port 993; choose no security only on a trusted "
           "network."), True),
    "login": Failure(
        N_("The IMAP server refused the login of the bounce mailbox {username}: {reason}."),
        N_("Check the mailbox's username and password; some providers need an application "
           "password for IMAP, or IMAP to be turned on for the mailbox."), False),
    "folder": Failure(
        N_("The folder {folder} cannot be opened in the bounce mailbox: {reason}."),
        N_("Check the folder's name (INBOX unless the bounces are sorted into another "
           "folder); most servers tell capitals from small letters."), False),
    "disconnected": Failure(
        N_("The IMAP server {host}:{port} dropped the connection ({reason})."),
        N_("Postier tries again at the next look. If it keeps happening, check the security "
           "setting and the server's connection limits."), True),
    "imap_error": Failure(
        N_("The IMAP server {host}:{port} answered with an error ({reason})."),
        N_("Postier tries again at the next look."), True),
}

# What OpenSSL says when the other end of an implicit TLS connection answers in clear text.
_NOT_TLS = ("wrong version", "record layer", "packet length")
# imaplib's words when STARTTLS is asked of a server that does not offer it.
_NO_STARTTLS = "not supported"
# Every error a conversation with the server may raise by itself (ssl and socket errors
# are OSErrors); anything else is a bug and goes up as it is.
_IMAP_ERRORS = (imaplib.IMAP4.error, OSError, EOFError)
# imapclient's "<command> failed: " and imaplib's b'...' around a server's reply add
# nothing for a person.
_NOISE = re.compile(r"^\w+ failed: |^b'(.*)'$|^b\"(.*)\"$", re.S)


def mailbox_tls_context(mailbox: BounceMailbox) -> ssl.SSLContext:
    """The system's authorities plus ``POSTIER_CA_FILE``, as for the relays
    (:func:`postier.delivery.tls.tls_context`); no check when the settings say so."""
    ctx = ssl.create_default_context()
    extra = os.environ.get("POSTIER_CA_FILE")
    if extra:
        # Academic mail servers often use an internal CA: trust it besides the system's.
        ctx.load_verify_locations(cafile=extra)
    if not mailbox.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def read_mailbox(mailbox: BounceMailbox, handle: Callable[[bytes], None], *,
                 limit: int = 100, max_size: int = MAX_SIZE,
                 timeout: float = 30.0) -> MailboxRead:
    """Hand the oldest ``limit`` unread messages of the folder to ``handle``, each marked
    as read once ``handle`` returned; a message larger than ``max_size`` bytes is marked
    as read without being fetched (``skipped``). If ``handle`` raises, the look stops
    there: that message and the following stay unread for the next look, and the
    exception goes up as it is. Raises :class:`MailboxError` when the server fails."""
    with _session(mailbox, timeout, readonly=False) as (talk, client):
        with talk.at("search"):
            # UIDs grow with arrival: the smallest are the oldest.
            waiting = sorted(client.search(["UNSEEN"]))
        batch = waiting[:max(limit, 0)]
        with talk.at("fetch"):
            sizes = client.fetch(batch, ["RFC822.SIZE"]) if batch else {}
        read = skipped = 0
        for uid in batch:
            size = sizes.get(uid, {}).get(b"RFC822.SIZE")
            if size is None:
                continue  # removed from the folder since the search
            if size > max_size:
                _mark_seen(talk, client, uid)
                skipped += 1
            elif _hand_over(talk, client, uid, handle):
                read += 1
        return MailboxRead(read=read, skipped=skipped, left=len(waiting) - len(batch))


async def poll_mailbox(mailbox: BounceMailbox, handle: Callable[[bytes], None], *,
                       limit: int = 100, max_size: int = MAX_SIZE,
                       timeout: float = 30.0,  # noqa: ASYNC109 - the sockets', in the thread
                       ) -> MailboxRead:
    """:func:`read_mailbox` in a thread, so the event loop goes on meanwhile; ``handle``
    runs in that thread."""
    return await asyncio.to_thread(read_mailbox, mailbox, handle, limit=limit,
                                   max_size=max_size, timeout=timeout)


def check_mailbox(mailbox: BounceMailbox, *, timeout: float = 15.0) -> int:
    """Connect, log in and open the folder read-only: the number of unread messages.
    Changes nothing in the mailbox. Raises :class:`MailboxError` as :func:`read_mailbox`."""
    with _session(mailbox, timeout, readonly=True) as (talk, client), talk.at("search"):
        return len(client.search(["UNSEEN"]))


def _hand_over(talk: _Talk, client: Any, uid: int, handle: Callable[[bytes], None]) -> bool:
    with talk.at("fetch"):
        # PEEK: the server must not mark the message read before the handler has it.
        raw = client.fetch([uid], ["BODY.PEEK[]"]).get(uid, {}).get(b"BODY[]")
    if raw is None:
        return False  # removed from the folder since the search
    handle(bytes(raw))
    _mark_seen(talk, client, uid)
    return True


def _mark_seen(talk: _Talk, client: Any, uid: int) -> None:
    with talk.at("store"):
        client.add_flags([uid], [SEEN])


class _Talk:
    """One conversation with the mailbox's server, each step of which (:meth:`at`) words
    its failures for what was being done."""

    def __init__(self, mailbox: BounceMailbox, timeout: float) -> None:
        self.mailbox = mailbox
        self.timeout = timeout

    @contextmanager
    def at(self, step: str) -> Iterator[None]:
        try:
            yield
        except _IMAP_ERRORS as exc:
            error = explain(exc, step, self.mailbox, self.timeout)
            if _mentions_password(exc, self.mailbox.password):
                raise error from None  # the cause's text would show the password
            raise error from exc


@contextmanager
def _session(mailbox: BounceMailbox, timeout: float, *,
             readonly: bool) -> Iterator[tuple[_Talk, Any]]:
    """Connected, secured, logged in and with the folder open; logged out afterwards,
    whatever happened."""
    if not mailbox.host:
        raise failure("not_configured", mailbox)
    if mailbox.password is None:
        raise failure("no_password", mailbox)
    talk = _Talk(mailbox, timeout)
    implicit = mailbox.security == Security.TLS
    with talk.at("connect"):
        client = IMAPClient(mailbox.host, port=mailbox.port, ssl=implicit, timeout=timeout,
                            ssl_context=mailbox_tls_context(mailbox) if implicit else None)
    try:
        if mailbox.security == Security.STARTTLS:
            with talk.at("tls"):
                client.starttls(mailbox_tls_context(mailbox))
        with talk.at("login"):
            _log_in(client, mailbox.username, mailbox.password)
        with talk.at("select"):
            client.select_folder(mailbox.folder, readonly=readonly)
        yield talk, client
    finally:
        _leave(client)


def _log_in(client: Any, username: str, password: str) -> None:
    if username.isascii() and password.isascii():
        client.login(username, password)
    else:
        # imaplib sends LOGIN's arguments in ASCII only; SASL PLAIN carries UTF-8 (RFC 4616),
        # so a password with accents still logs in.
        client.plain_login(username, password)


def _leave(client: Any) -> None:
    try:
        client.logout()
    except _IMAP_ERRORS:
        # The connection may be what just failed; what was read and marked stays so.
        try:
            client.shutdown()
        except _IMAP_ERRORS:
            pass


def failure(kind: str, mailbox: BounceMailbox, *, step: str = "", timeout: float = 0.0,
            reason: str = "") -> MailboxError:
    """The failure ``kind`` (a key of :data:`FAILURES`) with the mailbox's details."""
    f = FAILURES[kind]
    return MailboxError(f.message, hint=f.hint, failure=kind, transient=f.transient,
                        step=step, host=mailbox.host, port=mailbox.port,
                        username=mailbox.username, folder=mailbox.folder,
                        timeout=f"{timeout:g}", reason=reason)


def explain(exc: BaseException, step: str, mailbox: BounceMailbox,
            timeout: float) -> MailboxError:
    """Word a failure at ``step`` of a conversation with ``mailbox``'s server."""
    kind, reason = _what_failed(exc, step, mailbox)
    return failure(kind, mailbox, step=step, timeout=timeout,
                   reason=_scrub(reason, mailbox.password))


def _what_failed(exc: BaseException, step: str, mailbox: BounceMailbox) -> tuple[str, str]:
    """The failure's kind (a key of :data:`FAILURES`) and its reason, from the exception
    and the causes it carries."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, socket.gaierror):
            return "dns", _reason(e)
        if isinstance(e, ssl.SSLCertVerificationError):
            return "tls_certificate", e.verify_message or _reason(e)
    for e in chain:
        if isinstance(e, ssl.SSLError):
            text = str(e).lower()
            if mailbox.security == Security.TLS and any(s in text for s in _NOT_TLS):
                return "tls_unexpected", _reason(e)
            return "tls_failed", _reason(e)
        if isinstance(e, ConnectionRefusedError):
            return "refused", _reason(e)
        if isinstance(e, TimeoutError):
            if step == "connect" and mailbox.port == 993 and mailbox.security != Security.TLS:
                return "tls_expected", _reason(e)
            return "timeout", _reason(e)
    return _broken_conversation(exc, step, chain), _reason(exc)


def _broken_conversation(exc: BaseException, step: str, chain: list[BaseException]) -> str:
    """A failure once connected: the server said no, or went away."""
    if step == "tls" and _NO_STARTTLS in str(exc).lower():
        return "starttls_unavailable"
    # imapclient turns whatever breaks during a login into a LoginError: a connection
    # lost at that moment must not read as a wrong password.
    if any(isinstance(e, imaplib.IMAP4.abort | EOFError | ConnectionError) for e in chain):
        return "disconnected"
    if any(isinstance(e, OSError) for e in chain):
        # No route to the host, network down: nothing was ever connected.
        return "unreachable" if step == "connect" else "disconnected"
    if isinstance(exc, LoginError) or step == "login":
        return "login"
    if step == "select":
        return "folder"
    return "imap_error"


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _reason(exc: BaseException) -> str:
    text = (str(exc) or type(exc).__name__).strip()
    match = _NOISE.match(text)
    while match:
        inner = match.group(1) or match.group(2)
        text = (inner if inner is not None else text[match.end():]).strip()
        match = _NOISE.match(text)
    # Templates end their sentences themselves: "... (reason)." not "... (reason.)."
    return text.rstrip(".")


def _scrub(text: str, password: str | None) -> str:
    return text.replace(password, "…") if password else text


def _mentions_password(exc: BaseException, password: str | None) -> bool:
    if not password:
        return False
    return any(password in str(e) for e in _chain(exc))
