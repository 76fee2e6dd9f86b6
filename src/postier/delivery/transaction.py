"""Sending one e-mail on an open relay connection, and the relay's answer per recipient.

:func:`send_on` runs one mail transaction (``MAIL``, the ``RCPT``s, ``DATA``, the message)
on a :class:`~postier.delivery.session.RelaySession`, pipelined when the relay allows it.
Delivery and the test-send both come here; the result says, for each recipient, whether
the e-mail was sent, is deferred or failed, and whether the connection may carry another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib

from postier.core.settings import RelaySettings
from postier.delivery.classify import classify, failure
from postier.delivery.session import RelaySession, Reply, mail_command, path
from postier.delivery.steps import StepCallback, TransactionSteps
from postier.errors import DeliveryError


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


def same_for_all(recipients: Sequence[str], err: DeliveryError, *,
                 reusable: bool) -> TransactionResult:
    """Every recipient deferred by ``err`` (or failed, when it is permanent)."""
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
        return same_for_all(recipients, failure("smtputf8_unsupported", "mail_from"),
                            reusable=True)
    report = TransactionSteps(on_step)
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
        return _envelope_lost(exc, relay, envelope_from, recipients, replies, report)
    except BaseException:
        # Cancelled (the test-send's budget, a shutdown): the replies that came count.
        report.replies(replies[:1], replies[1:n + 1])
        raise
    if replies[0][0] != 250:
        err = _sender_refused(relay, replies[0], envelope_from, report)
        reusable = await _reset(session, replies[n + 1] if len(replies) > n + 1 else None)
        return same_for_all(recipients, err, reusable=reusable)
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
        session.close()
        return _content_lost(exc, relay, recipients, accepted, results, report)
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


def _envelope_lost(exc: Exception, relay: RelaySettings, envelope_from: str,
                   recipients: Sequence[str], replies: list[Reply],
                   report: TransactionSteps) -> TransactionResult:
    """The connection failed before the message was sent (the session is closed): the
    recipients the relay answered keep its answer, the others are deferred."""
    n = len(recipients)
    if replies and replies[0][0] != 250:
        # The relay refused the sender, then hung up ("421 4.7.0 Try again later,
        # closing connection"): its reply explains, not the hang-up (a "slow down"
        # then pauses the relay instead of counting as a failure of it).
        return same_for_all(recipients, _sender_refused(relay, replies[0], envelope_from,
                                                        report), reusable=False)
    got = len(replies)
    err = classify(exc, "mail_from" if got == 0 else "rcpt_to" if got <= n else "data",
                   relay)
    report.replies(replies[:1], replies[1:n + 1])
    report(err.step or "mail_from", False, err.reply or str(exc))
    results: dict[str, RcptResult] = {}
    _rcpt_results(relay, recipients, replies[1:], results)
    for r in recipients:
        results.setdefault(r, RcptResult(r, "deferred", None, err.reply))
    return TransactionResult([results[r] for r in recipients], error=err, reusable=False)


def _content_lost(exc: Exception, relay: RelaySettings, recipients: Sequence[str],
                  accepted: Sequence[str], results: dict[str, RcptResult],
                  report: TransactionSteps) -> TransactionResult:
    """Lost during or after the message (the session is closed): the relay may or may
    not have it. Retrying risks a duplicate; not retrying risks a loss. We never lose:
    the accepted recipients are deferred."""
    err = classify(exc, "data", relay)
    report("data", False, err.reply or str(exc))
    for r in accepted:
        results[r] = RcptResult(r, "deferred", None, err.reply)
    return TransactionResult([results[r] for r in recipients], error=err, reusable=False)


def _sender_refused(relay: RelaySettings, reply: Reply, envelope_from: str,
                    report: TransactionSteps) -> DeliveryError:
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
