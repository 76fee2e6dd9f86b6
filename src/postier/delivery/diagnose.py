"""The test-send ("Tester l'envoi d'e-mails"): a real e-mail, reported step by step.

:func:`test_send` talks to the relay with the same code as delivery
(:func:`~postier.delivery.connection.open_session` and
:func:`~postier.delivery.transaction.send_on`, pipelined when the relay offers it),
watching every step (resolve, connect, greeting or implicit TLS, EHLO, STARTTLS, AUTH,
MAIL FROM, RCPT TO, DATA) with its timing and the server's own reply. The first failure
stops the test and is explained in the user's language: what happened and what to do
("Délai dépassé : augmentez le délai d'attente du serveur").

On top of the classification of failures (:mod:`postier.delivery.classify`), the test-send
can afford one more connection to be sure instead of guessing: when no greeting arrives
on a port configured without implicit TLS, it tries a short TLS handshake on the same
port and, if that works, says the port expects implicit TLS.

The connection check ("Vérifier la connexion") is the same conversation stopped before
MAIL FROM: connect, TLS, authentication, then QUIT, no e-mail sent. Either way the report
carries the SMTP conversation (commands and replies, AUTH payloads masked:
:mod:`postier.delivery.transcript`) for a help desk, and says when the settings tested
are not saved yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiosmtplib
from babel.numbers import format_decimal

from postier.core import dkim_signing
from postier.core.dkim_signing import DkimKey
from postier.core.settings import AuthMethod, RelaySettings, Security
from postier.delivery import test_email
from postier.delivery.classify import classify
from postier.delivery.connection import open_session
from postier.delivery.session import RelaySession, path
from postier.delivery.steps import elapsed_ms
from postier.delivery.test_email import SECURITY_LABELS
from postier.delivery.transaction import send_on
from postier.delivery.transcript import Transcript
from postier.errors import DeliveryError
from postier.i18n import N_, normalize, translate

__all__ = ["SenderCheck", "Step", "TestReport", "Transcript", "test_send"]

# The whole test-send is bounded by this many times the relay's timeout (each step is
# bounded by the timeout itself, but an implicit-TLS connection alone may take two).
BUDGET_FACTOR = 3
# A suggestion to raise the timeout is made when one step took more than this share of it.
TIGHT_SHARE = 1 / 3
# Highest timeout the settings accept (RelaySettings.timeout).
MAX_TIMEOUT = 600
UNSAVED_OK = N_("These settings work but are not saved yet: click Save.")
UNSAVED_FAILED = N_("These settings are not saved yet: the saved settings are still the "
                    "ones in use.")

STEP_LABELS: dict[str, str] = {
    "resolve": N_("name resolution"),
    "connect": N_("connection"),
    "greeting": N_("server greeting"),
    "tls": "TLS",
    "starttls": "STARTTLS",
    "ehlo": "EHLO",
    "auth": N_("authentication"),
    "mail_from": N_("sender (MAIL FROM)"),
    "rcpt_to": N_("recipient (RCPT TO)"),
    "data": N_("message (DATA)"),
    "quit": "QUIT",
}

@dataclass
class Step:
    """One step of the conversation: its name, outcome, duration and the server's reply."""

    step: str
    ok: bool
    ms: int
    detail: str


@dataclass
class SenderCheck:
    """Whether the relay accepts ``MAIL FROM:<address>`` (``code``/``reply``: its answer)."""

    address: str
    ok: bool
    code: int | None
    reply: str


@dataclass
class TestReport:
    """What the test-send found; :meth:`as_dict` is the HTTP API's JSON shape."""

    __test__ = False  # not a pytest test class, despite its name

    ok: bool
    steps: list[Step]
    error: dict[str, Any] | None
    latency_ms: int | None
    suggestion: str | None
    sender_checks: list[dict[str, Any]] = field(default_factory=list)
    dkim: dict[str, Any] | None = None
    sent: bool = False
    unsaved: bool = False
    unsaved_message: str | None = None
    conversation: list[str] = field(default_factory=list)
    # A connection check (no e-mail): known to whoever asked, so not in the API's shape.
    check: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "sent": self.sent,
            "unsaved": self.unsaved,
            "unsaved_message": self.unsaved_message,
            "conversation": list(self.conversation),
            "steps": [asdict(s) for s in self.steps],
            "error": None if self.error is None else dict(self.error),
            "latency_ms": self.latency_ms,
            "suggestion": self.suggestion,
            "sender_checks": [dict(c) for c in self.sender_checks],
            "dkim": self.dkim,
        }


async def test_send(
    relay: RelaySettings,
    *,
    to: str,
    sender_name: str,
    sender_address: str,
    lang: str = "en",
    local_hostname: str | None = None,
    check_senders: Sequence[str] = (),
    label: str = "",
    dkim_key: DkimKey | None = None,
    send: bool = True,
    unsaved: bool = False,
) -> TestReport:
    """Send a real test e-mail to ``to`` through ``relay`` and report every step.

    The e-mail goes from ``sender_address`` (envelope and From, with ``sender_name``); its
    subject and body are in ``lang`` and the body lists the settings tested (server, port,
    security, authentication, username, and ``label`` when given — never the password).
    The addresses are expected to have been validated by the caller
    (:func:`postier.core.policy.normalize_address`); a line break in them raises ValueError.

    Time limits: every step is bounded by ``relay.timeout`` (a step that takes longer fails
    with code ``timeout``), and the whole test-send — including the TLS probe of
    :meth:`_Run.explain_open_failure` — by ``3 × relay.timeout``, so a server that answers
    each step just in time still cannot keep the user waiting for long. The sender checks
    (:func:`_sender_checks`) come after it and have their own budget of
    ``3 × relay.timeout``; the final QUIT waits at most 2 s.

    On the first failure the test stops: the failing step is the last of ``steps`` (with
    ``ok`` false) and ``error`` explains it (``code``, ``message``, ``hint`` in ``lang``).
    After a success, ``latency_ms`` is the total time and ``suggestion`` may propose a
    longer timeout (:meth:`_Run.suggestion`).

    ``send=False`` checks the connection only: the steps stop after authentication and
    the connection ends with QUIT (its own step); nothing is sent, and the recipient, the
    message and the DKIM key are not used. ``unsaved``: the settings tested differ from
    the saved ones; the report says so (``unsaved_message``) and so does the test e-mail.
    """
    lang = normalize(lang)
    run = _Run(relay, lang, send=send)
    data, dkim_report = b"", None
    if send:
        data = test_email.compose(relay, to=to, sender_name=sender_name,
                                  sender_address=sender_address, lang=lang, label=label,
                                  unsaved=unsaved)
        if dkim_key is not None:
            data, dkim_report = await _signed(data, dkim_key)
    smtp: RelaySession | None = None
    checks: list[SenderCheck] = []
    try:
        smtp, error, latency_ms = await _within_budget(
            run, data if send else None, to=to, sender_address=sender_address,
            local_hostname=local_hostname)
        if check_senders:
            smtp, checks = await _sender_checks(run, error, check_senders, smtp,
                                                local_hostname)
    finally:
        if smtp is not None:
            await run.quit(smtp)
    return run.report(error, latency_ms, checks, dkim_report, unsaved)


async def _signed(data: bytes, key: DkimKey) -> tuple[bytes, dict[str, Any]]:
    """The test e-mail signed as deliveries are, and checked against the record to
    publish, so the administrator knows the key works before the first real e-mail."""
    signed = await asyncio.to_thread(dkim_signing.sign, data, key)
    return signed, {
        "domain": key.domain,
        "selector": key.selector,
        "record": key.record_name,
        "verified": await asyncio.to_thread(dkim_signing.verify, signed, key),
    }


async def _within_budget(
    run: _Run,
    data: bytes | None,
    *,
    to: str,
    sender_address: str,
    local_hostname: str | None,
) -> tuple[RelaySession | None, DeliveryError | None, int | None]:
    """:func:`_converse` within ``BUDGET_FACTOR`` × the relay's timeout; the connection
    (if still open), the failure (the last step), and the total time after a success."""
    smtputf8 = not (to.isascii() and sender_address.isascii())
    budget = float(BUDGET_FACTOR * run.relay.timeout)
    start = time.perf_counter()
    smtp: RelaySession | None = None
    limit = asyncio.timeout(budget)
    try:
        async with limit:
            smtp, error = await _converse(
                run, data, to=to, sender_address=sender_address, smtputf8=smtputf8,
                local_hostname=local_hostname, deadline=start + budget,
            )
    except TimeoutError:
        if not limit.expired():
            raise
        error = run.budget_exceeded(budget)  # (_converse closed the connection)
    if error is not None:
        run.ensure_failed_step(error)
        return smtp, error, None
    return smtp, None, elapsed_ms(start)


async def _converse(
    run: _Run,
    data: bytes | None,
    *,
    to: str,
    sender_address: str,
    smtputf8: bool,
    local_hostname: str | None,
    deadline: float,
) -> tuple[RelaySession | None, DeliveryError | None]:
    """Connect and send ``data`` (None: stop before MAIL FROM); return the connection (if
    one was opened) and the failure."""
    relay = run.relay
    try:
        smtp = await open_session(relay, local_hostname=local_hostname, on_step=run.on_step,
                                  on_connect=run.transcript.attach)
    except DeliveryError as err:
        return None, await run.explain_open_failure(err, deadline)
    run.transcript.follow(smtp)
    if data is None:
        return smtp, None
    try:
        result = await send_on(
            smtp, relay, sender_address, [to], data, smtputf8=smtputf8, on_step=run.on_step
        )
    except BaseException:
        smtp.close()
        raise
    rcpt = result.recipients[0]
    if result.error is None and rcpt.status != "sent":
        # A refused recipient is a per-recipient result, not a transaction error: explain
        # it the way delivery would.
        refused = aiosmtplib.SMTPRecipientRefused(rcpt.code or 0, rcpt.reply, to)
        return smtp, classify(refused, "rcpt_to", relay)
    return smtp, result.error


test_send.__test__ = False  # type: ignore[attr-defined]  # pytest: not a test


# -- one test run ----------------------------------------------------------------------------


class _Run:
    """Collects the steps of one test-send and renders what it found."""

    def __init__(self, relay: RelaySettings, lang: str, *, send: bool = True) -> None:
        self.relay = relay
        self.lang = lang
        self.send = send
        self.steps: list[Step] = []
        self.transcript = Transcript()
        self._mark = time.perf_counter()

    def on_step(self, step: str, ok: bool, ms: int, detail: str) -> None:
        self.steps.append(Step(step, ok, ms, detail))
        self._mark = time.perf_counter()

    def expected_steps(self) -> list[str]:
        relay = self.relay
        out = ["resolve", "connect", "tls" if relay.security == Security.TLS else "greeting"]
        out.append("ehlo")
        if relay.security == Security.STARTTLS:
            out.append("tls")
        if relay.auth == AuthMethod.PASSWORD:
            out.append("auth")
        return [*out, "mail_from", "rcpt_to", "data"] if self.send else [*out, "quit"]

    def current_step(self) -> str:
        expected = self.expected_steps()
        return expected[min(len(self.steps), len(expected) - 1)]

    def ensure_failed_step(self, error: DeliveryError) -> None:
        """Make sure the failure is the last step (it is not when it happened between the
        steps the connection reports, e.g. an unconfigured relay or the budget running out)."""
        if self.steps and not self.steps[-1].ok:
            return
        step = error.step or self.current_step()
        detail = error.reply or str(error)
        self.steps.append(Step(step, False, elapsed_ms(self._mark), detail))

    def budget_exceeded(self, budget: float) -> DeliveryError:
        relay = self.relay
        return DeliveryError(
            N_("Timed out: the test did not finish within {limit} s (3 × the server timeout "
               "of {timeout} s); it was at step {step}."),
            hint=N_("Increase the server timeout (now {timeout} s), or check the host and "
                    "port."),
            code="timeout", transient=True, step=self.current_step(),
            reply=f"no answer within the test's {budget:g} s budget",
            host=relay.host, port=relay.port, timeout=relay.timeout, limit=f"{budget:g}",
        )

    async def explain_open_failure(self, err: DeliveryError, deadline: float) -> DeliveryError:
        """Replace the classification's guess about a missing greeting with a TLS probe's
        answer: when no greeting arrives (timeout, connection closed, or not SMTP) and the
        security is none or STARTTLS, a TLS handshake is tried on the same port (for at
        most a quarter of the timeout, between 0.5 and 3 s, and never beyond the budget):
        if it succeeds, the error is ``tls_expected`` — the port speaks implicit TLS."""
        relay = self.relay
        if err.step != "greeting" or relay.security == Security.TLS or not _no_greeting(err):
            return err
        wait = min(_probe_time(relay.timeout), deadline - time.perf_counter())
        version = await _tls_probe(relay, wait) if wait > 0.05 else None
        if version is not None:
            if self.steps and self.steps[-1].step == "greeting":
                self.steps[-1].detail += (
                    f" (a TLS handshake on {relay.host}:{relay.port} succeeded: {version})"
                )
            return DeliveryError(
                N_("{host}:{port} expects implicit TLS (a TLS handshake on this port "
                   "succeeded), but the security setting is {security}."),
                hint=N_("This port expects implicit TLS: choose TLS security (or, to keep "
                        "STARTTLS, use the server's submission port, usually 587)."),
                code="tls_expected", transient=True, step=err.step, reply=err.reply,
                host=relay.host, port=relay.port, timeout=relay.timeout,
                security=relay.security.value,
            )
        if err.code == "tls_expected":
            # The classification guessed from port 465 alone; the probe says otherwise.
            return DeliveryError(
                N_("Timed out: {host} did not answer within {timeout} s (at step {step})."),
                hint=N_("Increase the server timeout (now {timeout} s), or check the host "
                        "and port."),
                code="timeout", transient=True, step=err.step, reply=err.reply,
                host=relay.host, port=relay.port, timeout=relay.timeout,
            )
        return err

    def report(self, error: DeliveryError | None, latency_ms: int | None,
               checks: list[SenderCheck], dkim: dict[str, Any] | None,
               unsaved: bool) -> TestReport:
        ok = error is None
        return TestReport(
            ok=ok,
            steps=self.steps,
            error=None if error is None else self.render(error),
            latency_ms=latency_ms,
            suggestion=None if error is not None else self.suggestion(),
            sender_checks=[asdict(c) for c in checks],
            dkim=dkim,
            sent=ok and self.send,
            unsaved=unsaved,
            unsaved_message=translate(self.lang, UNSAVED_OK if ok else UNSAVED_FAILED)
            if unsaved else None,
            conversation=self.transcript.lines,
            check=not self.send,
        )

    def render(self, err: DeliveryError) -> dict[str, Any]:
        return _render(err, self.lang)

    async def quit(self, smtp: RelaySession) -> None:
        """End the connection; a connection check reports its QUIT as a step."""
        connected = smtp.is_connected
        start = time.perf_counter()
        reply = await _quit(smtp, self.relay)
        if not self.send and connected and (not self.steps or self.steps[-1].ok):
            self.steps.append(Step("quit", reply is not None, elapsed_ms(start),
                                   reply or "no answer to QUIT"))

    def suggestion(self) -> str | None:
        """A larger timeout when the slowest step took more than a third of it: three
        times that step's duration, rounded up to a whole second (at most 600 s), so the
        slowest step would then take at most a third of it."""
        if not self.steps:
            return None
        slowest = max(self.steps, key=lambda s: s.ms)
        timeout = self.relay.timeout
        if slowest.ms <= timeout * 1000 * TIGHT_SHARE:
            return None
        suggested = min(MAX_TIMEOUT, max(timeout + 1, math.ceil(slowest.ms / 1000 / TIGHT_SHARE)))
        if suggested <= timeout:
            return None
        seconds = format_decimal(round(slowest.ms / 1000, 1), format="0.0", locale=self.lang)
        return translate(
            self.lang,
            N_("The slowest step ({step}) took {seconds} s, more than a third of the server "
               "timeout ({timeout} s): set the server timeout to {suggested} s so that a "
               "busy server does not end in \"Timed out\"."),
            step=translate(self.lang, STEP_LABELS.get(slowest.step, slowest.step)),
            seconds=seconds, timeout=timeout, suggested=suggested,
        )


def _render(err: DeliveryError, lang: str) -> dict[str, Any]:
    """``{code, message, hint}`` in ``lang``, with the step and security named in it."""
    params = dict(err.params)
    if isinstance(params.get("step"), str):
        params["step"] = translate(lang, STEP_LABELS.get(params["step"], params["step"]))
    if isinstance(params.get("security"), str):
        params["security"] = translate(
            lang, SECURITY_LABELS.get(params["security"], params["security"])
        )
    message = translate(lang, err.template, **params)
    hint = translate(lang, err.hint_template, **params) if err.hint_template else None
    return {"code": err.code, "message": message, "hint": hint}


def _no_greeting(err: DeliveryError) -> bool:
    """Whether a failure at the greeting means "no SMTP greeting came", as opposed to a
    proper SMTP refusal (``421 Service not available``) or a refused connection."""
    if err.smtp_code is not None and 200 <= err.smtp_code < 600:
        return False
    return err.code in ("timeout", "tls_expected", "disconnected", "unexpected", "smtp_error")


def _probe_time(timeout: int) -> float:
    # A TLS server answers a ClientHello within a round trip; don't wait the whole timeout
    # again for a server that already failed to greet us.
    return max(0.5, min(timeout / 4, 3.0))


async def _tls_probe(relay: RelaySettings, wait: float) -> str | None:
    """The TLS version if a TLS handshake with ``relay``'s host:port succeeds within
    ``wait`` seconds (certificate not checked: only "does it speak TLS" matters)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(wait):
            _, writer = await asyncio.open_connection(
                relay.host, relay.port, ssl=ctx, server_hostname=relay.host or None,
                family=socket.AF_UNSPEC,
            )
            ssl_object = writer.get_extra_info("ssl_object")
            version = ssl_object.version() if ssl_object is not None else None
            return str(version or "TLS")
    except Exception:  # refused, reset, timed out, not TLS: all mean "no"
        return None
    finally:
        if writer is not None:
            writer.transport.abort()


# -- sender checks ---------------------------------------------------------------------------


async def _sender_checks(
    run: _Run,
    error: DeliveryError | None,
    addresses: Sequence[str],
    smtp: RelaySession | None,
    local_hostname: str | None,
) -> tuple[RelaySession | None, list[SenderCheck]]:
    """For each address, whether the relay accepts ``MAIL FROM:<address>`` (then ``RSET``:
    nothing is sent), on the test's connection when it is still usable, on a new one
    otherwise (``code``/``reply``: the relay's answer; ``code`` is None when the relay gave
    none); they never change the test's outcome. When the test failed before reaching
    MAIL FROM, they are reported as not checked."""
    if error is None or any(s.step == "mail_from" for s in run.steps):
        return await _check_senders(run.relay, addresses, smtp, lang=run.lang,
                                    local_hostname=local_hostname)
    reason = run.render(error)["message"]
    return smtp, [
        SenderCheck(a, False, None, translate(run.lang, N_("Not checked: {reason}"),
                                              reason=reason))
        for a in _unique(addresses)
    ]


async def _check_senders(
    relay: RelaySettings,
    addresses: Sequence[str],
    smtp: RelaySession | None,
    *,
    lang: str,
    local_hostname: str | None,
) -> tuple[RelaySession | None, list[SenderCheck]]:
    """Ask the relay about each sender with MAIL FROM then RSET; return the connection
    (to be closed by the caller) and one result per distinct address."""
    todo = _unique(addresses)
    done: list[SenderCheck] = []
    budget = float(BUDGET_FACTOR * relay.timeout)

    def fail_rest(reason: str) -> None:
        text = translate(lang, N_("Not checked: {reason}"), reason=reason)
        done.extend(SenderCheck(a, False, None, text) for a in todo[len(done):])

    limit = asyncio.timeout(budget)
    try:
        async with limit:
            for address in todo:
                if smtp is None or not smtp.is_connected:
                    if smtp is not None:
                        smtp.close()
                    smtp = None
                    try:
                        smtp = await open_session(relay, local_hostname=local_hostname)
                    except DeliveryError as err:
                        fail_rest(_render(err, lang)["message"])
                        break
                done.append(await _check_one(smtp, relay, address, lang))
    except TimeoutError:
        if not limit.expired():
            raise
        if smtp is not None:  # cut in mid-command: not fit for more
            smtp.close()
        fail_rest(_render(classify(TimeoutError(), "mail_from", relay), lang)["message"])
    return smtp, done


async def _check_one(
    smtp: RelaySession, relay: RelaySettings, address: str, lang: str
) -> SenderCheck:
    utf8 = not address.isascii()
    if utf8 and not smtp.supports_extension("smtputf8"):
        return SenderCheck(address, False, None, translate(
            lang, N_("The SMTP server does not accept international (non-ASCII) addresses.")
        ))
    try:
        code, text = await smtp.command(
            b"MAIL FROM:" + path(address, utf8) + (b" SMTPUTF8" if utf8 else b"") + b"\r\n")
    except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
        smtp.close()  # lost or desynchronised: the next address gets a new connection
        err = classify(exc, "mail_from", relay)
        return SenderCheck(address, False, None, _render(err, lang)["message"])
    check = SenderCheck(address, code == 250, code, text)
    try:
        await smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        smtp.close()
    return check


# -- helpers ---------------------------------------------------------------------------------


def _unique(addresses: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(a.strip() for a in addresses if a.strip()))


async def _quit(smtp: RelaySession, relay: RelaySettings) -> str | None:
    """Say goodbye politely but briefly, then make sure the connection is closed; return
    the server's reply to QUIT (None without one)."""
    reply: str | None = None
    if smtp.is_connected:
        with contextlib.suppress(Exception):
            code, text = await asyncio.wait_for(
                smtp.command(b"QUIT\r\n"), min(2.0, float(relay.timeout)))
            reply = f"{code} {text}"
    smtp.close()
    return reply


