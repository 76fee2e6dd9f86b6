"""Talking to an SMTP relay: connection steps, per-recipient transactions, error diagnosis.

The same code serves delivery (through :class:`RelayPool`, which reuses connections and
bounds how many are open per relay, per process and, with ``max_connections``, for all
the workers together) and the test-send, which watches each step through the
``on_step`` callback. Every failure becomes a :class:`~postier.errors.DeliveryError` with a
stable code, a message and a remedy, and whether trying again later may help.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiosmtplib

from postier.core.settings import AuthMethod, RelaySettings, Security
from postier.delivery.limits import error_from
from postier.delivery.session import RelaySession, Reply, mail_command, path
from postier.errors import DeliveryError
from postier.i18n import N_

if TYPE_CHECKING:
    from postier.delivery.limits import ConnectionLease, SharedLimits
    from postier.store.base import RelayPause

log = logging.getLogger("postier.delivery")

StepCallback = Callable[[str, bool, int, str], None]
ConnectCallback = Callable[[aiosmtplib.SMTP, aiosmtplib.SMTPResponse], None]

# Reply texts that mean "slow down" rather than "this recipient is wrong" (Exchange Online:
# "4.4.2 message submission rate ... exceeded"; Google: "peak SMTP relay limit exceeded").
_RATE = re.compile(r"\brate\b|\btoo many\b|\bthrottl|\blimit exceeded\b|\b4\.4\.2\b", re.I)


@dataclass
class RcptResult:
    address: str
    status: str  # sent | deferred | failed
    code: int | None
    reply: str


@dataclass
class TransactionResult:
    recipients: list[RcptResult]
    error: DeliveryError | None = None  # set when the whole message could not go through
    reusable: bool = True  # whether the connection may carry another message
    steps: list[tuple[str, bool, int, str]] = field(default_factory=list)


def relay_label(relay: RelaySettings) -> str:
    return relay.describe()


def tls_context(relay: RelaySettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    extra = os.environ.get("POSTIER_CA_FILE")
    if extra:
        # Academic relays often use an internal CA: trust it in addition to the system's.
        ctx.load_verify_locations(cafile=extra)
    if not relay.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- diagnosis -------------------------------------------------------------------------------


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _reply(exc: BaseException) -> tuple[int | None, str]:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code, exc.message
    return None, str(exc)


def _reason(exc: BaseException) -> str:
    # Templates end their sentences themselves: "... (reason)." not "... (reason.)."
    return (str(exc) or type(exc).__name__).strip().rstrip(".")


def classify(exc: BaseException, step: str, relay: RelaySettings) -> DeliveryError:
    """Explain a failure at ``step`` of a conversation with ``relay``: the message and
    hint are the administrator's (what to change); each code's words for the sender (what
    happens, whether anything is asked of them) are in :data:`postier.core.reasons.SENDER`."""
    if isinstance(exc, DeliveryError):
        return exc
    params: dict[str, Any] = {
        "host": relay.host,
        "port": relay.port,
        "timeout": relay.timeout,
    }
    chain = _chain(exc)
    code, reply = _reply(exc)
    for e in chain:
        if isinstance(e, socket.gaierror):
            return DeliveryError(
                N_("The SMTP server name {host} cannot be found."),
                hint=N_("Check the server name (for example smtp.ac-lyon.fr) and this "
                        "computer's network connection."),
                code="dns", transient=True, step=step, reply=str(e), **params,
            )
        if isinstance(e, ssl.SSLCertVerificationError):
            return DeliveryError(
                N_("The TLS certificate of {host} cannot be verified: {reason}."),
                hint=N_("Check the server name (it must match the certificate), or ask the "
                        "relay's administrator for a valid certificate."),
                code="tls_certificate", transient=True, step=step,
                reply=str(e), reason=e.verify_message or str(e), **params,
            )
    for e in chain:
        if isinstance(e, ssl.SSLError):
            text = str(e).lower()
            if relay.security == Security.TLS and (
                "wrong version" in text or "record layer" in text or "packet length" in text
            ):
                return DeliveryError(
                    N_("{host}:{port} does not speak implicit TLS."),
                    hint=N_("Choose STARTTLS security (usually port 587), or the port of "
                            "the server's implicit TLS (usually 465)."),
                    code="tls_unexpected", transient=True, step=step, reply=str(e), **params,
                )
            return DeliveryError(
                N_("The TLS handshake with {host} failed: {reason}."),
                hint=N_("Check the security setting (STARTTLS or TLS) matches the port."),
                code="tls_failed", transient=True, step=step, reply=str(e), reason=str(e),
                **params,
            )
        if isinstance(e, ConnectionRefusedError):
            return DeliveryError(
                N_("Nothing answers at {host}:{port} (connection refused)."),
                hint=N_("Check the port number and that the SMTP server is running."),
                code="refused", transient=True, step=step, reply=str(e), **params,
            )
    if any(isinstance(e, TimeoutError | asyncio.TimeoutError) for e in chain):
        if relay.port == 465 and relay.security != Security.TLS and step in (
            "greeting", "connect", "ehlo",
        ):
            return DeliveryError(
                N_("Port {port} expects implicit TLS, but the security setting is "
                   "{security}."),
                hint=N_("Choose TLS security for port 465, or use STARTTLS on port 587."),
                code="tls_expected", transient=True, step=step, reply=str(exc),
                security=relay.security.value, **params,
            )
        return DeliveryError(
            N_("Timed out: {host} did not answer within {timeout} s (at step {step})."),
            hint=N_("Increase the server timeout (now {timeout} s), or check the host and "
                    "port."),
            code="timeout", transient=True, step=step, reply=str(exc), **params,
        )
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError) or (
        step == "auth" and code is not None
    ):
        return DeliveryError(
            N_("The SMTP server refused the username or password ({reply_code} {reply})."),
            hint=N_("Check the username and password of the SMTP account; some providers "
                    "need an application password or OAuth2."),
            code="auth_failed", transient=True, step=step, smtp_code=code, reply=reply,
            reply_code=code, **params,
        )
    if code == 530 and "starttls" in reply.lower():
        return DeliveryError(
            N_("{host}:{port} requires STARTTLS before sending ({reply_code} {reply})."),
            hint=N_("Choose STARTTLS security (or TLS if the port is 465)."),
            code="tls_required", transient=True, step=step, smtp_code=code, reply=reply,
            reply_code=code, **params,
        )
    if code == 530 or (code is not None and "authentication required" in reply.lower()):
        return DeliveryError(
            N_("The SMTP server requires authentication ({reply_code} {reply})."),
            hint=N_("Choose password authentication and enter the SMTP account's username "
                    "and password."),
            code="auth_required", transient=True, step=step, smtp_code=code, reply=reply,
            reply_code=code, **params,
        )
    if code is not None and 400 <= code < 500 and _RATE.search(reply):
        return DeliveryError(
            N_("The SMTP server asks to slow down ({reply_code} {reply})."),
            hint=N_("Nothing to do: Postier waits and tries again. If it lasts, lower the "
                    "sending rate or ask the provider for a higher limit."),
            code="rate_limited", transient=True, step=step, smtp_code=code, reply=reply,
            reply_code=code, **params,
        )
    if step == "mail_from" and code is not None:
        return DeliveryError(
            N_("The SMTP server refuses the sender address ({reply_code} {reply})."),
            hint=N_("Check the allowed domains and the sender address in the settings: the "
                    "relay only accepts addresses it is allowed to send for."),
            code="sender_refused", transient=code < 500, step=step, smtp_code=code,
            reply=reply, reply_code=code, **params,
        )
    if step == "rcpt_to" and code is not None:
        return DeliveryError(
            N_("The SMTP server refuses the recipient ({reply_code} {reply})."),
            hint=N_("Check the recipient's address."),
            code="recipient_refused", transient=code < 500, step=step, smtp_code=code,
            reply=reply, reply_code=code, **params,
        )
    if isinstance(exc, aiosmtplib.SMTPException) and code is None and step == "auth":
        return DeliveryError(
            N_("{host}:{port} does not offer authentication ({reason})."),
            hint=N_("Choose no authentication if this server accepts your e-mails without "
                    "it; otherwise check the port and the security (many servers offer "
                    "authentication only after STARTTLS)."),
            code="auth_unsupported", transient=True, step=step, reply=str(exc),
            reason=_reason(exc), **params,
        )
    if isinstance(exc, aiosmtplib.SMTPNotSupported) and step == "tls":
        return DeliveryError(
            N_("{host}:{port} does not offer STARTTLS."),
            hint=N_("Choose TLS security if the port is 465, or ask for a port that offers "
                    "STARTTLS; choose no security only on a trusted network."),
            code="starttls_unavailable", transient=True, step=step, reply=str(exc), **params,
        )
    if code is None and step == "tls" and isinstance(
        exc, ConnectionError | aiosmtplib.SMTPServerDisconnected | OSError
    ):
        # Cut during the TLS handshake: the relay refused it (an aborted handshake shows
        # as a reset, not as an ssl.SSLError).
        return DeliveryError(
            N_("The TLS handshake with {host} failed: {reason}."),
            hint=N_("Check the security setting (STARTTLS or TLS) matches the port."),
            code="tls_failed", transient=True, step=step, reply=str(exc),
            reason=_reason(exc), **params,
        )
    if code is None and isinstance(
        exc, ConnectionError | aiosmtplib.SMTPServerDisconnected | OSError
    ):
        return DeliveryError(
            N_("The connection to {host}:{port} was lost ({reason})."),
            hint=N_("Postier will try again. If it keeps happening, check the security "
                    "setting and the server's limits."),
            code="disconnected", transient=True, step=step, reply=str(exc),
            reason=_reason(exc), **params,
        )
    if code is not None:
        return DeliveryError(
            N_("The SMTP server answered {reply_code} {reply} (at step {step})."),
            hint=N_("Postier will try again later.") if code < 500 else None,
            code="smtp_error" if code < 500 else "rejected", transient=code < 500,
            step=step, smtp_code=code, reply=reply, reply_code=code, **params,
        )
    return DeliveryError(
        N_("Unexpected error at step {step}: {reason}."),
        code="unexpected", transient=True, step=step, reply=str(exc),
        reason=_reason(exc), **params,
    )


# -- one connection --------------------------------------------------------------------------


class _Steps:
    """Times steps and reports them; re-raises failures as classified errors."""

    def __init__(self, relay: RelaySettings, on_step: StepCallback | None) -> None:
        self.relay = relay
        self.on_step = on_step

    @contextlib.asynccontextmanager
    async def step(self, name: str) -> AsyncIterator[list[str]]:
        detail: list[str] = []
        start = time.perf_counter()
        try:
            yield detail
        except Exception as exc:
            err = classify(exc, name, self.relay)
            if self.on_step:
                self.on_step(name, False, _ms(start), err.reply or str(exc))
            raise err from exc
        if self.on_step:
            self.on_step(name, True, _ms(start), " ".join(detail))


def _ms(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)


async def open_smtp(
    relay: RelaySettings,
    *,
    local_hostname: str | None = None,
    on_step: StepCallback | None = None,
    on_connect: ConnectCallback | None = None,
) -> aiosmtplib.SMTP:
    """Connect, greet, secure and authenticate, step by step; return a ready connection.
    ``on_connect`` sees the connection and its greeting before EHLO (the test-send
    records the conversation from there)."""
    if not relay.configured:
        raise DeliveryError(
            N_("No SMTP server is configured."),
            hint=N_("An administrator must enter the SMTP server in Paramètres d'envoi des "
                    "e-mails."),
            code="not_configured", transient=True, step="resolve",
        )
    steps = _Steps(relay, on_step)
    loop = asyncio.get_running_loop()
    timeout = float(relay.timeout)
    async with steps.step("resolve") as d:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(relay.host, relay.port, type=socket.SOCK_STREAM), timeout
        )
        family, _, proto, _, address = infos[0]
        d.append(f"{address[0]!s}")
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.setblocking(False)
    # Each command group and each message is one write: send it at once, never held back
    # by Nagle's algorithm waiting for an ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        async with steps.step("connect") as d:
            await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
            d.append(f"{address[0]!s}:{address[1]!s}")
        smtp = aiosmtplib.SMTP(
            hostname=relay.host,
            local_hostname=local_hostname,
            timeout=timeout,
            use_tls=relay.security == Security.TLS,
            start_tls=False,
            # Building a context reads the system's certificates (tens of ms of CPU):
            # only for a connection that will use TLS.
            tls_context=None if relay.security == Security.NONE else tls_context(relay),
            sock=sock,
        )
        async with steps.step("tls" if relay.security == Security.TLS else "greeting") as d:
            greeting = await smtp.connect()
            d.append(f"{greeting.code} {greeting.message}")
            if on_connect is not None:
                on_connect(smtp, greeting)
    except BaseException:
        sock.close()
        raise
    try:
        async with steps.step("ehlo") as d:
            ehlo = await smtp.ehlo()
            d.append(f"{ehlo.code} {ehlo.message.splitlines()[0] if ehlo.message else ''}")
        if relay.security == Security.STARTTLS:
            async with steps.step("tls") as d:
                if not smtp.supports_extension("starttls"):
                    # Never fall back to clear text: the administrator asked for TLS.
                    raise aiosmtplib.SMTPNotSupported("STARTTLS not advertised")
                resp = await smtp.starttls()
                d.append(f"{resp.code} {resp.message}")
                await smtp.ehlo()
        if relay.auth == AuthMethod.PASSWORD:
            async with steps.step("auth") as d:
                resp = await smtp.login(relay.username, relay.password or "")
                d.append(f"{resp.code} {resp.message}")
        elif relay.auth == AuthMethod.OAUTH2:
            from postier.delivery import oauth2

            async with steps.step("auth") as d:
                token = await oauth2.access_token(relay)
                try:
                    resp = await smtp.auth_xoauth2(relay.username, token)
                except aiosmtplib.SMTPAuthenticationError:
                    oauth2.forget(relay)
                    raise
                d.append(f"{resp.code} {resp.message}")
    except BaseException:
        smtp.close()
        raise
    return smtp


async def open_session(
    relay: RelaySettings,
    *,
    local_hostname: str | None = None,
    on_step: StepCallback | None = None,
    on_connect: ConnectCallback | None = None,
) -> RelaySession:
    """:func:`open_smtp`, then the connection taken over for :func:`send_on`."""
    smtp = await open_smtp(relay, local_hostname=local_hostname, on_step=on_step,
                           on_connect=on_connect)
    try:
        return RelaySession.take_over(smtp, float(relay.timeout), pipelining=relay.pipelining)
    except Exception as exc:
        smtp.close()
        raise classify(exc, "ehlo", relay) from exc


def _all(recipients: Sequence[str], err: DeliveryError, *, reusable: bool) -> TransactionResult:
    status = "deferred" if err.transient else "failed"
    return TransactionResult(
        [RcptResult(r, status, err.smtp_code, err.reply or err.message()) for r in recipients],
        error=err,
        reusable=reusable,
    )


async def send_on(
    session: RelaySession,
    relay: RelaySettings,
    envelope_from: str,
    recipients: Sequence[str],
    data: bytes,
    *,
    smtputf8: bool = False,
    on_step: StepCallback | None = None,
) -> TransactionResult:
    """Send one message on an open session, pipelined when the relay allows it; return one
    result per recipient. Delivery and the test-send both come here (the test-send
    watches the steps through ``on_step``: when pipelined, the envelope's replies come
    together and the first of them carries the group's time).

    Connection-level failures are reported in ``error`` with every recipient that has no
    final answer yet deferred (or failed, when the failure is permanent)."""
    if smtputf8 and not session.supports_extension("smtputf8"):
        return _all(recipients, _no_smtputf8(), reusable=True)
    report = _Report(on_step)
    n = len(recipients)
    replies: list[Reply] = []
    results: dict[str, RcptResult] = {}
    try:
        mail = mail_command(envelope_from, len(data), smtputf8=smtputf8,
                            extensions=session.extensions)
        rcpts = [b"RCPT TO:" + path(r, smtputf8) + b"\r\n" for r in recipients]
        await session.envelope(mail, rcpts, replies)
    except Exception as exc:
        # Cut off, timed out or out of step before the message itself was sent.
        session.close()
        if replies and replies[0][0] != 250:
            # The relay refused the sender, then hung up ("421 4.7.0 Try again later,
            # closing connection"): its reply explains, not the hang-up (a "slow down"
            # then pauses the relay instead of counting as a failure of it).
            return _all(recipients, _sender_refused(relay, replies[0], envelope_from,
                                                    report), reusable=False)
        got = len(replies)
        err = classify(exc, "mail_from" if got == 0 else "rcpt_to" if got <= n else "data",
                       relay)
        report.replies(replies[:1], replies[1:n + 1])
        report(err.step or "mail_from", False, err.reply or str(exc))
        _rcpt_results(relay, recipients, replies[1:], results)
        for r in recipients:
            results.setdefault(r, RcptResult(r, "deferred", None, err.reply))
        return TransactionResult([results[r] for r in recipients], error=err,
                                 reusable=False)
    except BaseException:
        # Cancelled (the test-send's budget, a shutdown): the replies that came count.
        report.replies(replies[:1], replies[1:n + 1])
        raise
    if replies[0][0] != 250:
        err = _sender_refused(relay, replies[0], envelope_from, report)
        reusable = await _reset(session, replies[n + 1] if len(replies) > n + 1 else None)
        return _all(recipients, err, reusable=reusable)
    report.replies(replies[:1], replies[1:n + 1])
    slow_down = _rcpt_results(relay, recipients, replies[1:n + 1], results)
    accepted = [r for r in recipients if r not in results]
    data_reply = replies[n + 1] if len(replies) > n + 1 else None
    if not accepted or data_reply is None:
        reusable = await _reset(session, data_reply)
        return TransactionResult([results[r] for r in recipients], error=slow_down,
                                 reusable=reusable)
    if data_reply[0] != 354:
        err = classify(aiosmtplib.SMTPDataError(*data_reply), "data", relay)
        report("data", False, err.reply or data_reply[1])
        _settle(accepted, err, results)
        reusable = await _reset(session, None)
        return TransactionResult([results[r] for r in recipients], error=err,
                                 reusable=reusable)
    try:
        code, text = await session.content(data)
    except Exception as exc:
        # Lost during or after the message: the relay may or may not have it. Retrying
        # risks a duplicate; not retrying risks a loss. We never lose: retry.
        session.close()
        err = classify(exc, "data", relay)
        report("data", False, err.reply or str(exc))
        for r in accepted:
            results[r] = RcptResult(r, "deferred", None, err.reply)
        return TransactionResult([results[r] for r in recipients], error=err,
                                 reusable=False)
    if code != 250:
        err = classify(aiosmtplib.SMTPDataError(code, text), "data", relay)
        report("data", False, err.reply or text)
        _settle(accepted, err, results)
        return TransactionResult([results[r] for r in recipients], error=err,
                                 reusable=session.is_connected)
    report("data", True, f"{code} {text}")
    for r in accepted:
        results[r] = RcptResult(r, "sent", code, text)
    return TransactionResult([results[r] for r in recipients], error=slow_down)


class _Report:
    """The steps of a transaction for the test-send's ``on_step`` (nothing without it)."""

    def __init__(self, on_step: StepCallback | None) -> None:
        self.on_step = on_step
        self.mark = time.perf_counter()

    def __call__(self, step: str, ok: bool, detail: str) -> None:
        if self.on_step is not None:
            self.on_step(step, ok, _ms(self.mark), detail)
            self.mark = time.perf_counter()

    def replies(self, mail: Sequence[Reply], rcpts: Sequence[Reply]) -> None:
        """The sender's and the recipients' replies received so far."""
        if self.on_step is None:
            return
        for step, (code, text) in [*(("mail_from", r) for r in mail),
                                   *(("rcpt_to", r) for r in rcpts)]:
            ok = code == 250 or (step == "rcpt_to" and code == 251)
            self(step, ok, f"{code} {text}")


def _sender_refused(relay: RelaySettings, reply: Reply, envelope_from: str,
                    report: _Report) -> DeliveryError:
    code, text = reply
    err = classify(aiosmtplib.SMTPSenderRefused(code, text, envelope_from), "mail_from",
                   relay)
    report("mail_from", False, err.reply or text)
    return err


def _rcpt_results(relay: RelaySettings, recipients: Sequence[str], replies: Sequence[Reply],
                  results: dict[str, RcptResult]) -> DeliveryError | None:
    """Record the refused recipients among ``replies`` (in order, possibly fewer than the
    recipients); return a recipient-level "slow down" (Google's 450 4.2.1) if any."""
    slow_down = None
    for rcpt, (code, text) in zip(recipients, replies, strict=False):
        if code in (250, 251):
            continue
        err = classify(aiosmtplib.SMTPRecipientRefused(code, text, rcpt), "rcpt_to", relay)
        results[rcpt] = RcptResult(rcpt, "deferred" if err.transient else "failed",
                                   err.smtp_code, err.reply)
        if err.code == "rate_limited":
            slow_down = err
    return slow_down


def _settle(accepted: Sequence[str], err: DeliveryError,
            results: dict[str, RcptResult]) -> None:
    status = "deferred" if err.transient else "failed"
    for r in accepted:
        results[r] = RcptResult(r, status, err.smtp_code, err.reply)


async def _reset(session: RelaySession, data_reply: Reply | None) -> bool:
    """End a transaction that will not send its message; whether the session can carry
    the next one."""
    try:
        if data_reply is not None and data_reply[0] == 354:
            await session.abandon_data()
        await session.rset()
    except Exception:
        session.close()
        return False
    return session.is_connected


def _no_smtputf8() -> DeliveryError:
    return DeliveryError(
        N_("The SMTP server does not accept international (non-ASCII) addresses."),
        hint=N_("Use ASCII addresses, or a relay that supports SMTPUTF8."),
        code="smtputf8_unsupported", transient=False, step="mail_from",
    )


# -- the pool --------------------------------------------------------------------------------


@dataclass
class _Idle:
    smtp: RelaySession
    since: float
    # The relay's shared connection slot this connection holds (max_connections).
    lease: ConnectionLease | None = None


# Given the relay's answer to an e-mail; the worker records the result there. The
# connection's next e-mail may start meanwhile, but its content waits for that record, so
# that at any instant each connection has at most one e-mail the relay took whose result
# the store does not hold yet (what a killed worker may repeat).
Settle = Callable[[TransactionResult], Awaitable[None]]


class LeaseLost(Exception):
    """The worker no longer holds the message: another worker may be sending it."""


class PrioritySlots:
    """A semaphore whose waiters are served establishment by establishment in turn
    (round-robin over ``group``), and within one most urgent first (lowest priority
    number), then in arrival order: an establishment's bulk mailing waiting for a relay
    shared by several establishments does not hold back another's e-mail, and within an
    establishment a normal e-mail overtakes its bulk mailing."""

    def __init__(self, size: int) -> None:
        self._free = size
        # Per group, its waiters as a heap; the groups with waiters in the order of their
        # turn (a group goes to the back once served).
        self._waiters: dict[int, list[tuple[int, int, asyncio.Future[None]]]] = {}
        self._turn: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._counter = 0

    async def acquire(self, priority: int = 0, group: int = 0) -> None:
        if self._free > 0 and not self._turn:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._counter += 1
        heapq.heappush(self._waiters.setdefault(group, []), (priority, self._counter, fut))
        self._turn.setdefault(group, None)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # it was handed a slot just as it was cancelled
            else:
                self._forget(group, fut)
            raise

    def _forget(self, group: int, fut: asyncio.Future[None]) -> None:
        heap = [w for w in self._waiters.get(group, []) if w[2] is not fut]
        heapq.heapify(heap)
        if heap:
            self._waiters[group] = heap
        else:
            self._waiters.pop(group, None)
            self._turn.pop(group, None)

    def release(self) -> None:
        while self._turn:
            group = next(iter(self._turn))
            heap = self._waiters[group]
            _, _, fut = heapq.heappop(heap)
            if heap:
                self._turn.move_to_end(group)  # its next waiter after the other groups'
            else:
                del self._waiters[group], self._turn[group]
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next waiter
                return
        self._free += 1


class _RelayState:
    def __init__(self, concurrency: int, rate_pause: float) -> None:
        self.slots = PrioritySlots(concurrency)
        self.idle: list[_Idle] = []
        self.down_until = 0.0
        self.down_error: DeliveryError | None = None
        # Pace: the earliest time the next message may start (max_per_minute), and a pause
        # after the relay asked to slow down, longer each time it asks again in a row.
        self.next_start = 0.0
        self.paused_until = 0.0
        self.rate_pause = rate_pause
        self.pause = rate_pause
        self.pause_error: DeliveryError | None = None
        # Since when the relay keeps failing (connection, TLS, authentication): what the
        # backup relay's failover looks at. None while it answers.
        self.failing_since: float | None = None
        self.last_probe = 0.0
        # Set (then replaced) when a connection goes idle or a shared slot is given back:
        # what e-mails waiting for a connection slot wait on between two asks.
        self.freed = asyncio.Event()

    def signal_freed(self) -> None:
        self.freed.set()
        self.freed = asyncio.Event()

    def failed(self, err: DeliveryError) -> None:
        if err.transient and err.code in FAILOVER_CODES and self.failing_since is None:
            self.failing_since = time.monotonic()

    def answered(self) -> None:
        self.failing_since = None

    async def pace(self, per_minute: int | None) -> None:
        if not per_minute:
            return
        now = time.monotonic()
        start = max(now, self.next_start)
        self.next_start = start + 60.0 / per_minute
        if start > now:
            await asyncio.sleep(start - now)

    def slowed_down(self, err: DeliveryError) -> None:
        now = time.monotonic()
        if now >= self.paused_until:
            self.paused_until = now + self.pause
            self.pause = min(self.pause * 2, max(RATE_PAUSE_MAX, self.rate_pause))
        self.pause_error = err

    def went_through(self) -> None:
        self.pause = self.rate_pause

    def shared_pause(self, pause: RelayPause) -> None:
        """Another worker (or this one) paused the relay for everyone until then."""
        remaining = pause.paused_until - time.time()
        if remaining > 0:
            self.paused_until = max(self.paused_until, time.monotonic() + remaining)
            self.pause_error = error_from(pause.error) or self.pause_error or DeliveryError(
                N_("The SMTP server asks to slow down ({reply_code} {reply})."),
                code="rate_limited", transient=True, reply_code="", reply="")


# Failures that say the relay itself is unusable (not a refusal of this e-mail).
FAILOVER_CODES = frozenset({
    "refused", "timeout", "dns", "tls_failed", "tls_certificate", "tls_expected",
    "tls_unexpected", "tls_required", "starttls_unavailable", "auth_failed",
    "auth_required", "auth_unsupported", "disconnected", "oauth2_refused",
    "oauth2_unreachable", "unexpected", "smtp_error",
})
PROBE_EVERY = 5.0
RATE_PAUSE_MIN = 15.0
RATE_PAUSE_MAX = 600.0
# A connection holding one of a relay's shared slots (max_connections) is closed after
# this long idle, so that another worker can have the slot; reuse within a burst is
# unaffected.
SHARED_IDLE = 2.0
# Longest pause between two asks for a free connection slot.
SLOT_POLL_MAX = 0.5


class RelayPool:
    """Open connections per relay, reused across messages, at most ``concurrency`` each.

    With ``limits`` and a relay's ``max_connections``, each connection also holds one of
    the relay's slots shared by every worker (a lease in the store, one round trip per
    connection, not per message): without a free slot the e-mail waits up to
    ``limits.wait_at_most`` seconds, then is deferred (``relay_limit``, not an attempt).
    Such a connection is closed after ``shared_idle`` seconds idle to give its slot back,
    and after an e-mail when another worker waits for a slot for another establishment
    (``SharedLimits.hand_round``), so the slots go round the establishments.

    With ``limits``, the relay's failing state is shared too: the first failure of a run
    and the relay's return are written to the store, and ``failing_since()`` (what the
    failover and the alerts look at) is what every worker saw, at most a second old.

    A relay whose connection attempt fails is marked down for ``down_for`` seconds: the
    messages already waiting for it are deferred at once with the same explanation instead
    of each waiting out its own timeout (what Postfix calls a dead destination). The window
    is short so that a retry asked for after the relay is fixed really tries.
    """

    def __init__(
        self,
        *,
        concurrency: int = 4,
        idle_timeout: float = 30.0,
        down_for: float = 2.0,
        local_hostname: str | None = None,
        rate_pause: float = RATE_PAUSE_MIN,
        limits: SharedLimits | None = None,
        shared_idle: float = SHARED_IDLE,
    ) -> None:
        self.rate_pause = rate_pause
        self.shared_idle = shared_idle
        self._background: set[asyncio.Task[None]] = set()
        # The relays' limits and pauses shared with the other workers through the store;
        # without it (the workstation's outbox), this process paces on its own.
        self.limits = limits
        self.concurrency = concurrency
        self.idle_timeout = idle_timeout
        self.down_for = down_for
        self.local_hostname = local_hostname
        self._relays: dict[tuple[Any, ...], _RelayState] = {}
        self._probes: set[asyncio.Task[None]] = set()

    def _state(self, relay: RelaySettings) -> _RelayState:
        key = relay.key()
        state = self._relays.get(key)
        if state is None:
            state = self._relays[key] = _RelayState(self.concurrency, self.rate_pause)
        return state

    async def send(
        self,
        relay: RelaySettings,
        envelope_from: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        smtputf8: bool = False,
        priority: int = 0,
        establishment: int = 0,
        limit: float | None = None,
        still_ours: Callable[[], bool] | None = None,
        settle: Settle | None = None,
    ) -> TransactionResult:
        """Deliver one message. ``limit`` bounds the conversation itself — not the wait
        for a free connection or for the relay's pace, which are Postier's own doing.
        The relay's connections go to the ``establishment``s sending through it in turn.
        ``still_ours`` is asked once the turn has come: a message whose lease was lost
        meanwhile is not sent (:class:`LeaseLost`). ``settle`` is given the relay's
        answer, and awaited once the e-mail's turn is given to the next one; the
        connection's next e-mail does not reach the relay before it ends (see
        :data:`Settle`)."""
        state = self._state(relay)
        await state.slots.acquire(priority, establishment)
        # A shared connection slot taken for this e-mail and not yet given to a connection.
        spare: list[ConnectionLease] = []
        try:
            if self.limits is None:
                await state.pace(relay.max_per_minute)
            else:
                try:
                    pause = await self.limits.admit(relay, len(recipients))
                    if self._shared(relay) and not state.idle:
                        # Waiting for a slot is Postier's doing: not within ``limit``.
                        lease = await self._take_slot(state, relay, establishment)
                        if lease is not None:
                            spare.append(lease)
                except DeliveryError as err:  # over a limit until later: deferred to then
                    return _all(recipients, err, reusable=False)
                if pause is not None:
                    state.shared_pause(pause)
            if still_ours is not None and not still_ours():
                raise LeaseLost()
            async with asyncio.timeout(limit):
                result, settled = await self._send(
                    state, relay, envelope_from, recipients, data, smtputf8, spare, settle,
                    establishment)
        finally:
            state.slots.release()
            for lease in spare:
                self._release_later(state, lease)
        if settled is not None:
            await settled
        return result

    async def _send(
        self,
        state: _RelayState,
        relay: RelaySettings,
        envelope_from: str,
        recipients: Sequence[str],
        data: bytes,
        smtputf8: bool,
        spare: list[ConnectionLease],
        settle: Settle | None,
        establishment: int = 0,
    ) -> tuple[TransactionResult, asyncio.Future[None] | None]:
        """One conversation, and the recording of its result when ``settle`` is given (a
        task: the caller awaits it once the e-mail's slot is free)."""
        for attempt in range(2):
            now = time.monotonic()
            if state.down_error is not None and now < state.down_until:
                return _all(recipients, state.down_error, reusable=False), None
            if state.pause_error is not None and now < state.paused_until:
                # The relay asked to slow down: wait here without knocking on its door.
                return _all(recipients, state.pause_error, reusable=False), None
            try:
                smtp, lease, reused = await self._checkout(state, relay, spare,
                                                           establishment)
            except DeliveryError as err:  # no connection slot came free in time
                return _all(recipients, err, reusable=False), None
            if smtp is None:
                assert state.down_error is not None
                return _all(recipients, state.down_error, reusable=False), None
            try:
                result = await send_on(
                    smtp, relay, envelope_from, recipients, data, smtputf8=smtputf8
                )
            except BaseException:
                # Cancelled (shutdown, whole-delivery timeout): the conversation is in
                # an unknown state, so the connection cannot be reused.
                smtp.close()
                self._release_later(state, lease)
                raise
            if result.error is not None and result.error.code == "rate_limited":
                await self._slowed_down(state, relay, result.error)
            elif any(r.status == "sent" for r in result.recipients):
                state.went_through()
                if self.limits is not None:
                    await self.limits.went_through(relay)
            if result.error is not None and result.error.smtp_code is None:
                await self._failed(state, relay, result.error)
            else:
                await self._answered(state, relay)  # it replied: whatever it said, it is up
            reuse = result.reusable and smtp.is_connected and self._lease_ok(lease)
            handed = reuse and await self._hand_round(relay, lease, establishment)
            reuse = reuse and not handed
            # A reused connection the server had quietly closed: one fresh try.
            again = not reuse and reused and attempt == 0 and _nothing_happened(result)
            # The result is recorded while the connection may already carry the next
            # e-mail's envelope; that e-mail's content waits for it (RelaySession.content).
            settled = (None if again or settle is None
                       else asyncio.ensure_future(settle(result)))
            if reuse and smtp.is_connected and self._lease_ok(lease):
                smtp.unsettled = settled
                self._put_idle(state, _Idle(smtp, time.monotonic(), lease))
            else:
                smtp.close()
                self._release_later(state, lease, handed_round=handed)
                if again:
                    continue
            return result, settled
        raise AssertionError("unreachable")

    async def _checkout(
        self, state: _RelayState, relay: RelaySettings, spare: list[ConnectionLease],
        establishment: int = 0,
    ) -> tuple[RelaySession | None, ConnectionLease | None, bool]:
        """An idle connection, or a new one (holding a shared slot taken beforehand in
        ``spare``, or now). Raises ``relay_limit`` when no slot came free in time."""
        while True:
            while state.idle:
                idle = state.idle.pop()
                if (idle.smtp.is_connected and self._lease_ok(idle.lease)
                        and time.monotonic() - idle.since < self.idle_timeout):
                    for unused in spare:
                        self._release_later(state, unused)
                    spare.clear()
                    return idle.smtp, idle.lease, True
                idle.smtp.close()
                self._release_later(state, idle.lease)
            lease: ConnectionLease | None = None
            if self._shared(relay):
                lease = spare.pop() if spare else await self._take_slot(state, relay,
                                                                        establishment)
                if lease is None:
                    continue  # a connection of this process became idle meanwhile
            break
        try:
            smtp = await open_session(relay, local_hostname=self.local_hostname)
        except BaseException as exc:
            self._release_later(state, lease)
            if not isinstance(exc, DeliveryError):
                raise
            err = exc
            state.down_error = err
            state.down_until = time.monotonic() + self.down_for
            if err.code == "rate_limited":
                await self._slowed_down(state, relay, err)
            else:
                await self._failed(state, relay, err)
            return None, None, False
        state.down_error = None
        return smtp, lease, False

    # -- the relay's connection slots shared by every worker (max_connections) -----------

    def _shared(self, relay: RelaySettings) -> bool:
        return self.limits is not None and relay.max_connections is not None

    def _lease_ok(self, lease: ConnectionLease | None) -> bool:
        return lease is None or (self.limits is not None and lease.usable(self.limits.clock()))

    async def _take_slot(
        self, state: _RelayState, relay: RelaySettings, establishment: int = 0
    ) -> ConnectionLease | None:
        """A free connection slot of the relay among every worker's for an e-mail of
        ``establishment``, waiting in line for one up to ``limits.wait_at_most`` seconds;
        None when a connection of this process became idle meanwhile (use it instead)."""
        assert self.limits is not None
        deadline = time.monotonic() + self.limits.wait_at_most
        delay = 0.05
        while True:
            if state.idle:
                return None
            lease = await self.limits.take_connection(relay, establishment)
            if lease is not None:
                return lease
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.limits.connections_full(relay)
            # Ask again soon, or at once when this process frees a connection or a slot.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.freed.wait(), min(delay, left))
            delay = min(delay * 2, SLOT_POLL_MAX)

    def _put_idle(self, state: _RelayState, idle: _Idle) -> None:
        state.idle.append(idle)
        state.signal_freed()
        if idle.lease is not None:
            # Give the slot back if nothing of this process needs the connection soon.
            asyncio.get_running_loop().call_later(self.shared_idle, self._reap, state)

    def _reap(self, state: _RelayState) -> None:
        now = time.monotonic()
        if any(i.lease is not None and now - i.since >= self.shared_idle - 0.01
               for i in state.idle):
            self._spawn(self._close_state_idle(state, self.shared_idle, leased_only=True))

    async def _hand_round(self, relay: RelaySettings, lease: ConnectionLease | None,
                          establishment: int) -> bool:
        """Whether to give the connection's slot back after this e-mail, for the other
        workers waiting for it (see ``SharedLimits.hand_round``)."""
        if lease is None or self.limits is None:
            return False
        return await self.limits.hand_round(relay, lease, establishment)

    async def _release(self, state: _RelayState, lease: ConnectionLease,
                       handed_round: bool = False) -> None:
        assert self.limits is not None
        try:
            await self.limits.release_connection(lease, handed_round=handed_round)
        except Exception as exc:
            # Not given back: the slot lapses with its lease instead.
            log.warning("could not give back a connection slot of a relay: %s", exc)
        state.signal_freed()

    def _release_later(self, state: _RelayState, lease: ConnectionLease | None, *,
                       handed_round: bool = False) -> None:
        if lease is not None and not lease.released:
            self._spawn(self._release(state, lease, handed_round))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _slowed_down(
        self, state: _RelayState, relay: RelaySettings, err: DeliveryError
    ) -> None:
        state.slowed_down(err)
        if self.limits is not None:
            # Every worker pauses, not only the one that was told.
            state.shared_pause(await self.limits.slowed_down(
                relay, err, self.rate_pause, RATE_PAUSE_MAX))

    # -- the relay's failing state, shared by every worker (failover, alerts) -------------

    async def _failed(self, state: _RelayState, relay: RelaySettings,
                      err: DeliveryError) -> None:
        """The relay failed: told to every worker unless they know it fails already (a
        write at the first failure of a run, not at each)."""
        state.failed(err)
        if self.limits is None or state.failing_since is None:
            return
        try:
            if (await self.limits.health(relay)).failing_since is None:
                await self.limits.relay_failing(relay)
        except Exception as exc:  # told at its next failure
            log.warning("could not share that a relay fails: %s", exc)

    async def _answered(self, state: _RelayState, relay: RelaySettings) -> None:
        """The relay answered: no longer failing, for every worker (a write only when it
        was failing as they saw it)."""
        state.answered()
        if self.limits is None:
            return
        try:
            await self.limits.relay_answered(relay)
        except Exception as exc:
            log.warning("could not share that a relay answers again: %s", exc)

    async def failing_since(self, relay: RelaySettings) -> float | None:
        """Since when (wall clock) the relay has kept failing, as any worker saw it (as
        this process did, without shared limits); None while it answers. At most a
        second old: no round trip per e-mail."""
        if self.limits is not None:
            return (await self.limits.health(relay)).failing_since
        state = self._relays.get(relay.key())
        if state is None or state.failing_since is None:
            return None
        return time.time() - (time.monotonic() - state.failing_since)

    async def known(self, relay: RelaySettings) -> bool:
        """Whether the relay's state means something: this process talked to it, or a
        worker saw it fail or come back (without that, "not failing" says nothing of it:
        the alerts need the difference)."""
        if self.tried(relay):
            return True
        if self.limits is None:
            return False
        health = await self.limits.health(relay)
        return health.failing_since is not None or health.recovered_at is not None

    def failing_for(self, relay: RelaySettings) -> float:
        """Seconds the relay has kept failing as this process saw it (0 when it
        answers)."""
        state = self._relays.get(relay.key())
        if state is None or state.failing_since is None:
            return 0.0
        return time.monotonic() - state.failing_since

    def tried(self, relay: RelaySettings) -> bool:
        """Whether this process has talked (or tried to talk) to the relay: without that,
        ``failing_for()`` = 0 says nothing about it (the alerts need the difference)."""
        return relay.key() in self._relays

    def probe_later(self, relay: RelaySettings) -> None:
        """While the backup relay stands in, check in the background whether the main one
        answers again (connection, TLS, greeting, authentication; nothing is sent). With
        shared limits, one worker probes for all every ``PROBE_EVERY`` seconds, and its
        answer brings every worker back."""
        state = self._state(relay)
        now = time.monotonic()
        if now - state.last_probe < PROBE_EVERY:
            return
        state.last_probe = now
        task = asyncio.get_running_loop().create_task(self._probe(state, relay))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, state: _RelayState, relay: RelaySettings) -> None:
        lease = None
        if self.limits is not None:
            try:
                if not await self.limits.probe_turn(relay, PROBE_EVERY * 0.9):
                    return  # another worker probes it now
                if self._shared(relay):
                    lease = await self.limits.take_connection(relay, queue=False)
                    if lease is None:
                        return  # every slot is in use: the next probe will see
            except Exception as exc:
                log.warning("could not probe a relay: %s", exc)
                return
        try:
            try:
                smtp = await open_smtp(relay, local_hostname=self.local_hostname)
            except DeliveryError:
                return
            state.down_error = None
            await self._answered(state, relay)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(smtp.quit(), 2)
            smtp.close()
        finally:
            if lease is not None:
                await self._release(state, lease)

    async def close_idle(self, older_than: float | None = None) -> None:
        """Close the connections idle for ``older_than`` seconds (the idle timeout), then
        renew the shared connection slots of those still open (the worker's heartbeat
        calls this)."""
        limit = self.idle_timeout if older_than is None else older_than
        for state in list(self._relays.values()):
            await self._close_state_idle(state, limit)
        if self.limits is not None:
            await self.limits.renew_connections()

    async def _close_state_idle(
        self, state: _RelayState, older_than: float, *, leased_only: bool = False
    ) -> None:
        now = time.monotonic()
        keep: list[_Idle] = []
        done: list[_Idle] = []
        for idle in state.idle:
            if leased_only and idle.lease is None:
                keep.append(idle)
            elif (now - idle.since >= older_than - 0.01 or not idle.smtp.is_connected
                    or not self._lease_ok(idle.lease)):
                done.append(idle)
            else:
                keep.append(idle)
        state.idle = keep
        for idle in done:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(idle.smtp.quit(), 2)
            idle.smtp.close()
            if idle.lease is not None:
                await self._release(state, idle.lease)

    async def close(self) -> None:
        await self.close_idle(older_than=0)
        while pending := [t for t in self._background if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)


def _nothing_happened(result: TransactionResult) -> bool:
    return (
        result.error is not None
        and result.error.smtp_code is None
        and result.error.step in ("mail_from", "rcpt_to")
        and all(r.status == "deferred" for r in result.recipients)
    )
