"""When to try again: exponential backoff with jitter, bounded by a maximum age.

The shape of Postfix's queue (minimal backoff doubling to a maximum, a lifetime after
which the message is returned), with jitter so that a queue that built up while the relay
was down does not hit it again all at the same second.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from postier.core.settings import RetrySettings


@dataclass(frozen=True)
class RetryPolicy:
    first_delay: float = 60.0
    max_delay: float = 3600.0
    max_age: float = 5 * 86400.0
    jitter: float = 0.2

    @classmethod
    def from_settings(cls, s: RetrySettings) -> RetryPolicy:
        return cls(float(s.first_delay), float(s.max_delay), float(s.max_age))

    def delay(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1 for the first)."""
        base: float = min(self.max_delay, self.first_delay * 2.0 ** max(0, attempts - 1))
        return base * (1.0 - self.jitter + 2.0 * self.jitter * rand())

    def next_attempt(
        self,
        attempts: int,
        created_at: float,
        now: float,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """When to try next, or None when the message has been trying for too long.

        The last try is placed exactly at the end of the message's life rather than
        skipped, so a message is never given up early because of a long backoff.
        """
        deadline = created_at + self.max_age
        if now >= deadline:
            return None
        return min(now + self.delay(attempts, rand), deadline)
