"""A relay's failures: each code's explanation, and which code an exception is.

:data:`FAILURES` holds, per code, the administrator's words (a message saying what
happened and a hint saying what to change, English templates translated when shown) and
whether trying again later may help; the sender's words for each code are in
:data:`postier.core.reasons.SENDER`. :func:`classify` reads a failure at one step of a
conversation with a relay (an exception raised there, or the relay's refusal raised as
one) and turns it into a :class:`~postier.errors.DeliveryError` with its code.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import aiosmtplib

from postier.core.settings import RelaySettings, Security
from postier.errors import DeliveryError
from postier.i18n import N_


@dataclass(frozen=True)
class Failure:
    """What a failure code tells the administrator. ``transient`` None: as the relay's
    reply says (a 4xx may pass, a 5xx will not)."""

    code: str
    message: str
    hint: str | None
    transient: bool | None


_ANSWERED = N_("The SMTP server answered {reply_code} {reply} (at step {step}).")
_TLS_FAILED = N_("The TLS handshake with {host} failed: {reason}.")

FAILURES: dict[str, Failure] = {f.code: f for f in (
    Failure(code="not_configured", message=N_("No SMTP server is configured."),
            hint=N_("An administrator must enter the SMTP server in Paramètres d'envoi des "
                    "e-mails."), transient=True),
    Failure(code="dns", message=N_("The SMTP server name {host} cannot be found."),
            hint=N_("Check the server name (for example smtp.ac-lyon.fr) and this "
                    "computer's network connection."), transient=True),
    Failure(code="refused",
            message=N_("Nothing answers at {host}:{port} (connection refused)."),
            hint=N_("Check the port number and that the SMTP server is running."),
            transient=True),
    Failure(code="timeout",
            message=N_("Timed out: {host} did not answer within {timeout} s (at step "
                       "{step})."),
            hint=N_("Increase the server timeout (now {timeout} s), or check the host and "
                    "port."), transient=True),
    Failure(code="tls_certificate",
            message=N_("The TLS certificate of {host} cannot be verified: {reason}."),
            hint=N_("Check the server name (it must match the certificate), or ask the "
                    "relay's administrator for a valid certificate."), transient=True),
    Failure(code="tls_unexpected", message=N_("{host}:{port} does not speak implicit TLS."),
            hint=N_("Choose STARTTLS security (usually port 587), or the port of the "
                    "server's implicit TLS (usually 465)."), transient=True),
    Failure(code="tls_expected",
            message=N_("Port {port} expects implicit TLS, but the security setting is "
                       "{security}."),
            hint=N_("Choose TLS security for port 465, or use STARTTLS on port 587."),
            transient=True),
    Failure(code="tls_failed", message=_TLS_FAILED,
            hint=N_("Check the security setting (STARTTLS or TLS) matches the port."),
            transient=True),
    Failure(code="starttls_unavailable", message=N_("{host}:{port} does not offer STARTTLS."),
            hint=N_("Choose TLS security if the port is 465, or ask for a port that offers "
                    "STARTTLS; choose no security only on a trusted network."),
            transient=True),
    Failure(code="tls_required",
            message=N_("{host}:{port} requires STARTTLS before sending ({reply_code} "
                       "{reply})."),
            hint=N_("Choose STARTTLS security (or TLS if the port is 465)."), transient=True),
    Failure(code="auth_failed",
            message=N_("The SMTP server refused the username or password ({reply_code} "
                       "{reply})."),
            hint=N_("Check the username and password of the SMTP account; some providers "
                    "need an application password or OAuth2."), transient=True),
    Failure(code="auth_required",
            message=N_("The SMTP server requires authentication ({reply_code} {reply})."),
            hint=N_("Choose password authentication and enter the SMTP account's username "
                    "and password."), transient=True),
    Failure(code="auth_unsupported",
            message=N_("{host}:{port} does not offer authentication ({reason})."),
            hint=N_("Choose no authentication if this server accepts your e-mails without "
                    "it; otherwise check the port and the security (many servers offer "
                    "authentication only after STARTTLS)."), transient=True),
    Failure(code="rate_limited",
            message=N_("The SMTP server asks to slow down ({reply_code} {reply})."),
            hint=N_("Nothing to do: Postier waits and tries again. If it lasts, lower the "
                    "sending rate or ask the provider for a higher limit."), transient=True),
    Failure(code="sender_refused",
            message=N_("The SMTP server refuses the sender address ({reply_code} {reply})."),
            hint=N_("Check the allowed domains and the sender address in the settings: the "
                    "relay only accepts addresses it is allowed to send for."),
            transient=None),
    Failure(code="recipient_refused",
            message=N_("The SMTP server refuses the recipient ({reply_code} {reply})."),
            hint=N_("Check the recipient's address."), transient=None),
    Failure(code="smtputf8_unsupported",
            message=N_("The SMTP server does not accept international (non-ASCII) "
                       "addresses."),
            hint=N_("Use ASCII addresses, or a relay that supports SMTPUTF8."),
            transient=False),
    Failure(code="disconnected",
            message=N_("The connection to {host}:{port} was lost ({reason})."),
            hint=N_("Postier will try again. If it keeps happening, check the security "
                    "setting and the server's limits."), transient=True),
    Failure(code="smtp_error", message=_ANSWERED, hint=N_("Postier will try again later."),
            transient=True),
    Failure(code="rejected", message=_ANSWERED, hint=None, transient=False),
    Failure(code="unexpected", message=N_("Unexpected error at step {step}: {reason}."),
            hint=None, transient=True),
)}

# Reply texts that mean "slow down" rather than "this recipient is wrong" (Exchange Online:
# "4.4.2 message submission rate ... exceeded"; Google: "peak SMTP relay limit exceeded").
_RATE = re.compile(r"\brate\b|\btoo many\b|\bthrottl|\blimit exceeded\b|\b4\.4\.2\b", re.I)
# What OpenSSL says when the other end of an implicit TLS connection answers in clear text.
_NOT_TLS = ("wrong version", "record layer", "packet length")
# The steps before a STARTTLS: where a relay that expects implicit TLS stays silent.
_BEFORE_TLS = ("greeting", "connect", "ehlo")
# The failure a refusal means at a step, unless its reply says more.
_REFUSED_AT = {"mail_from": "sender_refused", "rcpt_to": "recipient_refused"}

# A failure code, the reply shown with it, and the further parameters of its words.
_Found = tuple[str, str, dict[str, Any]]


def failure(code: str, step: str) -> DeliveryError:
    """The failure ``code`` at ``step``, with no further parameter, as :data:`FAILURES`
    words it."""
    f = FAILURES[code]
    return DeliveryError(f.message, hint=f.hint, code=code, transient=f.transient, step=step)


def classify(exc: BaseException, step: str, relay: RelaySettings) -> DeliveryError:
    """Explain a failure at ``step`` of a conversation with ``relay``: the message and
    hint are the administrator's (what to change); each code's words for the sender (what
    happens, whether anything is asked of them) are in :data:`postier.core.reasons.SENDER`."""
    if isinstance(exc, DeliveryError):
        return exc
    smtp_code, reply = _reply(exc)
    code, shown, extra = (
        _unreachable(exc, step, relay)
        or (_breakdown(exc, step) if smtp_code is None
            else _refusal(exc, step, smtp_code, reply))
    )
    f = FAILURES[code]
    transient = f.transient if f.transient is not None else (
        smtp_code is not None and smtp_code < 500)
    return DeliveryError(f.message, hint=f.hint, code=code, transient=transient, step=step,
                         reply=shown, **extra, host=relay.host, port=relay.port,
                         timeout=relay.timeout)


def _unreachable(exc: BaseException, step: str, relay: RelaySettings) -> _Found | None:
    """The relay could not be reached or secured: its name, the connection, TLS, or no
    answer in time (anywhere in the exception's chain of causes)."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, socket.gaierror):
            return "dns", str(e), {}
        if isinstance(e, ssl.SSLCertVerificationError):
            return "tls_certificate", str(e), {"reason": e.verify_message or str(e)}
    for e in chain:
        if isinstance(e, ssl.SSLError):
            text = str(e).lower()
            if relay.security == Security.TLS and any(s in text for s in _NOT_TLS):
                return "tls_unexpected", str(e), {}
            return "tls_failed", str(e), {"reason": str(e)}
        if isinstance(e, ConnectionRefusedError):
            return "refused", str(e), {}
    if any(isinstance(e, TimeoutError | asyncio.TimeoutError) for e in chain):
        if relay.port == 465 and relay.security != Security.TLS and step in _BEFORE_TLS:
            return "tls_expected", str(exc), {"security": relay.security.value}
        return "timeout", str(exc), {}
    return None


def _refusal(exc: BaseException, step: str, smtp_code: int, reply: str) -> _Found:
    """The relay answered ``smtp_code`` with ``reply``."""
    text = reply.lower()
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError) or step == "auth":
        code = "auth_failed"
    elif smtp_code == 530 and "starttls" in text:
        code = "tls_required"
    elif smtp_code == 530 or "authentication required" in text:
        code = "auth_required"
    elif 400 <= smtp_code < 500 and _RATE.search(reply):
        code = "rate_limited"
    else:
        code = _REFUSED_AT.get(step) or ("smtp_error" if smtp_code < 500 else "rejected")
    return code, reply, {"smtp_code": smtp_code, "reply_code": smtp_code}


def _breakdown(exc: BaseException, step: str) -> _Found:
    """A failure the relay gave no reply for."""
    if isinstance(exc, aiosmtplib.SMTPException) and step == "auth":
        code = "auth_unsupported"
    elif isinstance(exc, aiosmtplib.SMTPNotSupported) and step == "tls":
        return "starttls_unavailable", str(exc), {}
    elif isinstance(exc, ConnectionError | aiosmtplib.SMTPServerDisconnected | OSError):
        # Cut during the TLS handshake: the relay refused it (an aborted handshake shows
        # as a reset, not as an ssl.SSLError).
        code = "tls_failed" if step == "tls" else "disconnected"
    else:
        code = "unexpected"
    return code, str(exc), {"reason": _reason(exc)}


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
