"""What one attempt's answers make of an e-mail: deferrals that are not the e-mail's fault
do not count as attempts."""

from __future__ import annotations

from postier.delivery.relay import RcptResult, TransactionResult
from postier.delivery.retry import RetryPolicy
from postier.delivery.worker import decide, store_away
from postier.errors import DeliveryError
from postier.store.base import Claimed, RecipientState

NOW = 1_800_000_000.0
RETRY = RetryPolicy(60.0, 3600.0, 3 * 86400.0)


def _claimed(attempts: int) -> Claimed:
    return Claimed(id="m1", establishment_id=1, user_id=1, envelope_from="a@ac-lyon.fr",
                   data=b"Subject: x\r\n\r\nx\r\n", smtputf8=False, attempts=attempts,
                   created_at=NOW - 600, recipients=[
                       RecipientState(0, "p@example.org", "deferred", 421, "busy")])


def _decide(claimed: Claimed, error: DeliveryError) -> tuple[str, int, float]:
    result = TransactionResult(
        [RcptResult("p@example.org", "deferred", None, error.message())], error=error,
        reusable=False)
    out = decide(claimed, list(claimed.recipients), result, RETRY, now=NOW,
                 started_at=NOW, duration_ms=1, relay="smtp.ac-lyon.fr:587")
    return out.status, out.attempts, out.next_attempt_at


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
