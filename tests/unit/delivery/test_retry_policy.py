"""When a deferred e-mail is tried again: later each time, never later than the maximum
delay, and never after the e-mail's life is over."""

from __future__ import annotations

import pytest

from postier.core.settings import RetrySettings
from postier.delivery.retry import RetryPolicy

POLICY = RetryPolicy(first_delay=60.0, max_delay=3600.0, max_age=3 * 86400.0)
CREATED = 1_800_000_000.0


def _middle() -> float:
    return 0.5  # the jitter's middle: the delay without jitter


def test_each_failed_attempt_waits_twice_as_long() -> None:
    delays = [POLICY.delay(n, _middle) for n in range(1, 7)]
    assert delays == [60.0, 120.0, 240.0, 480.0, 960.0, 1920.0]


def test_the_delay_stops_growing_at_the_maximum() -> None:
    assert POLICY.delay(7, _middle) == 3600.0
    assert POLICY.delay(200, _middle) == 3600.0


@pytest.mark.parametrize("attempts", [1, 3, 50])
def test_the_jitter_spreads_a_delay_by_a_fifth_either_way(attempts: int) -> None:
    base = POLICY.delay(attempts, _middle)
    assert POLICY.delay(attempts, lambda: 0.0) == pytest.approx(base * 0.8)
    assert POLICY.delay(attempts, lambda: 1.0) == pytest.approx(base * 1.2)
    assert POLICY.delay(attempts) <= POLICY.max_delay * 1.2


def test_the_next_try_comes_after_the_delay() -> None:
    now = CREATED + 600
    assert POLICY.next_attempt(2, CREATED, now, _middle) == now + 120.0


def test_the_last_try_is_at_the_end_of_the_e_mails_life_not_skipped() -> None:
    deadline = CREATED + POLICY.max_age
    assert POLICY.next_attempt(30, CREATED, deadline - 10, _middle) == deadline


def test_an_e_mail_past_its_life_is_given_up() -> None:
    deadline = CREATED + POLICY.max_age
    assert POLICY.next_attempt(30, CREATED, deadline, _middle) is None
    assert POLICY.next_attempt(1, CREATED, deadline + 1, _middle) is None


def test_the_policy_follows_the_settings() -> None:
    settings = RetrySettings(first_delay=120, max_delay=7200, max_age=86400)
    policy = RetryPolicy.from_settings(settings)
    assert (policy.first_delay, policy.max_delay, policy.max_age) == (120.0, 7200.0, 86400.0)
