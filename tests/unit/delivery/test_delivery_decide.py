"""What one attempt's answers make of an e-mail: sent, failed or tried again when; the
error the sender and the administrator read; deferrals that are not the e-mail's fault
do not count as attempts."""

from __future__ import annotations

import json

from postier.delivery.attempt import decide, store_away
from postier.delivery.retry import RetryPolicy
from postier.delivery.transaction import RcptResult, TransactionResult
from postier.errors import DeliveryError, PostierError, load
from postier.store.base import Claimed, Outcome, RecipientState

NOW = 1_800_000_000.0
RETRY = RetryPolicy(60.0, 3600.0, 3 * 86400.0)
RELAY = "smtp.ac-lyon.fr:587"


def _claimed(attempts: int, *recipients: RecipientState, age: float = 600) -> Claimed:
    return Claimed(id="m1", establishment_id=1, user_id=1, envelope_from="a@ac-lyon.fr",
                   data=b"Subject: x\r\n\r\nx\r\n", smtputf8=False, attempts=attempts,
                   created_at=NOW - age, recipients=list(recipients) or [
                       RecipientState(0, "p@example.org", "deferred", 421, "busy")])


def _outcome(claimed: Claimed, result: TransactionResult) -> Outcome:
    attempted = [r for r in claimed.recipients if r.status in ("pending", "deferred")]
    return decide(claimed, attempted, result, RETRY, now=NOW, started_at=NOW,
                  duration_ms=1, relay=RELAY)


def _decide(claimed: Claimed, error: DeliveryError) -> tuple[str, int, float]:
    result = TransactionResult(
        [RcptResult("p@example.org", "deferred", None, error.message())], error=error,
        reusable=False)
    out = _outcome(claimed, result)
    return out.status, out.attempts, out.next_attempt_at


def _answers(*answers: RcptResult) -> TransactionResult:
    return TransactionResult(list(answers))


def _error(out: Outcome) -> PostierError:
    """The e-mail's error as stored, to be shown to the sender and the administrator."""
    assert out.last_error is not None, "the e-mail's error was not stored"
    return load(json.loads(out.last_error))


def _pending(position: int, address: str) -> RecipientState:
    return RecipientState(position, address, "pending", None, None)


def test_a_database_outage_at_delivery_is_not_an_attempt() -> None:
    status, attempts, next_at = _decide(_claimed(3), store_away())
    assert status == "deferred"
    assert attempts == 3, "the relay was never reached: the backoff must not grow"
    assert next_at == NOW + RETRY.first_delay


def test_a_relay_failure_is_an_attempt() -> None:
    failure = DeliveryError("The SMTP server does not answer.", code="timeout",
                            transient=True, step="connect")
    status, attempts, next_at = _decide(_claimed(3), failure)
    assert status == "deferred" and attempts == 4
    assert next_at > NOW + RETRY.first_delay


def test_a_relay_failure_is_tried_again_after_the_backoff() -> None:
    failure = DeliveryError("The SMTP server does not answer.", code="timeout",
                            transient=True, step="connect")
    _, attempts, next_at = _decide(_claimed(0), failure)
    assert attempts == 1
    assert NOW + 48 <= next_at <= NOW + 72, "first retry: a minute, give or take a fifth"


def test_an_e_mail_every_recipient_took_is_sent() -> None:
    claimed = _claimed(0, _pending(0, "p@example.org"), _pending(1, "q@example.org"))
    out = _outcome(claimed, _answers(RcptResult("p@example.org", "sent", 250, "2.0.0 OK"),
                                     RcptResult("q@example.org", "sent", 250, "2.0.0 OK")))
    assert out.status == "sent" and out.attempts == 1 and out.last_error is None
    assert [r.status for r in out.recipients] == ["sent", "sent"]
    assert out.attempt.code == 250 and out.attempt.relay == RELAY
    assert out.attempt.detail == "p@example.org: 250 2.0.0 OK; q@example.org: 250 2.0.0 OK"


def test_a_recipient_refused_for_good_fails_with_the_relays_reply() -> None:
    claimed = _claimed(0, _pending(0, "p@example.org"))
    out = _outcome(claimed, _answers(
        RcptResult("p@example.org", "failed", 550, "5.1.1 No such user")))
    assert out.status == "failed"
    err = _error(out)
    assert err.code == "recipient_refused" and not err.transient
    assert err.message("en") == "The SMTP server refused p@example.org: 550 5.1.1 No such user"
    assert err.hint("en") == "Check the recipient's address."
    assert out.attempt.code == 550


def test_a_recipient_refused_for_now_is_tried_again() -> None:
    claimed = _claimed(0, _pending(0, "p@example.org"))
    out = _outcome(claimed, _answers(
        RcptResult("p@example.org", "deferred", 450, "4.2.1 Mailbox busy")))
    assert out.status == "deferred" and out.attempts == 1
    assert NOW + 48 <= out.next_attempt_at <= NOW + 72
    err = _error(out)
    assert err.code == "smtp_error" and err.transient
    assert err.hint("en") == "Postier will try again later."


def test_one_recipient_sent_and_one_refused_is_sent_with_the_refusal_told() -> None:
    claimed = _claimed(0, _pending(0, "p@example.org"), _pending(1, "q@example.org"))
    out = _outcome(claimed, _answers(
        RcptResult("p@example.org", "sent", 250, "2.0.0 OK"),
        RcptResult("q@example.org", "failed", 550, "5.1.1 No such user")))
    assert out.status == "sent"
    assert [r.status for r in out.recipients] == ["sent", "failed"]
    assert _error(out).message("en").startswith("The SMTP server refused q@example.org")


def test_a_retry_goes_only_to_the_recipients_still_waiting() -> None:
    claimed = _claimed(1, RecipientState(0, "p@example.org", "sent", 250, "OK"),
                       RecipientState(1, "q@example.org", "deferred", 450, "busy"))
    out = _outcome(claimed, _answers(RcptResult("q@example.org", "sent", 250, "2.0.0 OK")))
    assert out.status == "sent" and out.attempts == 2
    assert [(r.address, r.status) for r in out.recipients] == [("q@example.org", "sent")]


def test_a_relay_asking_to_slow_down_is_not_an_attempt() -> None:
    slow = DeliveryError("slow down", code="rate_limited", transient=True, smtp_code=451,
                         step="mail_from")
    status, attempts, next_at = _decide(_claimed(5), slow)
    assert (status, attempts) == ("deferred", 5)
    assert next_at == NOW + RETRY.first_delay, "no backoff growth: the first delay"


def test_a_sending_limit_waits_until_it_opens_again() -> None:
    limit = DeliveryError("limit", code="relay_limit", transient=True, step="connect",
                          resume_at=NOW + 1800.0)
    status, attempts, next_at = _decide(_claimed(2), limit)
    assert (status, attempts, next_at) == ("deferred", 2, NOW + 1800.0)


def test_waiting_for_a_limit_never_goes_past_the_e_mails_life() -> None:
    limit = DeliveryError("limit", code="relay_limit", transient=True, step="connect",
                          resume_at=NOW + 86400.0)
    claimed = _claimed(2, age=RETRY.max_age - 60)
    _, _, next_at = _decide(claimed, limit)
    assert next_at == claimed.created_at + RETRY.max_age


def test_the_last_retry_is_at_the_end_of_the_e_mails_life() -> None:
    failure = DeliveryError("x", code="timeout", transient=True, step="connect")
    claimed = _claimed(20, age=RETRY.max_age - 30)
    status, _, next_at = _decide(claimed, failure)
    assert status == "deferred" and next_at == claimed.created_at + RETRY.max_age


def test_an_e_mail_past_its_life_is_given_up_with_the_last_reason() -> None:
    failure = DeliveryError("The SMTP server does not answer.", code="timeout",
                            transient=True, step="connect")
    claimed = _claimed(20, age=RETRY.max_age)
    result = TransactionResult([RcptResult("p@example.org", "deferred", None, "no answer")],
                               error=failure, reusable=False)
    out = _outcome(claimed, result)
    assert out.status == "failed" and out.attempts == 21
    assert out.recipients[0].status == "failed"
    assert out.recipients[0].reply == "gave up after 3 days of trying; last reply: no answer"
    err = _error(out)
    assert err.code == "expired"
    assert err.message("en") == ("Gave up after 3 days of trying: The SMTP server does not "
                                 "answer.")
    assert err.hint("en") == ("Check the relay settings and the recipients' addresses, then "
                              "send the e-mail again.")


def test_a_slow_down_past_the_e_mails_life_gives_up_too() -> None:
    slow = DeliveryError("slow down", code="rate_limited", transient=True, step="mail_from")
    status, attempts, _ = _decide(_claimed(4, age=RETRY.max_age + 1), slow)
    assert (status, attempts) == ("failed", 5)
