"""Loops that depend on the store, through a database outage: how long to wait before the
next try (doubling, bounded), and a log line when an outage starts and one when it ends,
not one at every try.

Every background loop of every process (claims, lease renewal, wake-ups, alerts...) keeps
going whatever the store answers: a loop that ended on an error would leave the process
up, its readiness green and its e-mails undelivered until someone restarted it.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("postier.core.outage")

# The first wait after a failure, and the longest: a database that comes back is used
# again within this many seconds.
FIRST_WAIT = 0.25
LONGEST_WAIT = 3.0


class Outage:
    """One loop's view of the store's availability."""

    def __init__(self, what: str, *, first: float = FIRST_WAIT,
                 longest: float = LONGEST_WAIT) -> None:
        self.what = what
        self.first = first
        self.longest = longest
        self.since: float | None = None
        self._wait = first

    def failed(self, exc: BaseException) -> float:
        """Note a failure; the seconds to wait before trying again."""
        if self.since is None:
            self.since = time.monotonic()
            self._wait = self.first
            log.warning("%s: the store is unavailable (%s: %s); trying again until it "
                        "answers", self.what, type(exc).__name__, exc)
        else:
            self._wait = min(self._wait * 2, self.longest)
        return self._wait

    def worked(self) -> None:
        """Note a success: the end of an outage, if there was one."""
        if self.since is not None:
            log.warning("%s: the store answers again after %.1f s", self.what,
                        time.monotonic() - self.since)
            self.since = None

    async def pause(self, exc: BaseException) -> None:
        """Note a failure and wait before the next try."""
        await asyncio.sleep(self.failed(exc))
