"""Background loops that are started again when they end by an error, and that
readiness names while they are down.

The loops themselves survive the store's errors (see :mod:`postier.core.outage`); this is for
what nobody foresaw: a loop that dies anyway is logged with its stack, reported by
``/api/v1/ready`` and started again after a pause, instead of leaving the process up and
idle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from postier.core.aio import cancel_and_wait

log = logging.getLogger("postier.core.supervision")

# A loop that failed is named by readiness until it has run this long again.
SEEN_FOR = 10.0
FIRST_PAUSE = 1.0
LONGEST_PAUSE = 30.0

Loop = Callable[[], Coroutine[Any, Any, None]]


class Supervisor:
    """The background loops of one process."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []
        self._failed: dict[str, float] = {}  # name -> when it runs again (monotonic)

    def start(self, name: str, loop: Loop) -> asyncio.Task[None]:
        task = asyncio.create_task(self._keep(name, loop), name=f"postier-{name}")
        self.tasks.append(task)
        return task

    async def stop(self) -> None:
        await cancel_and_wait(*self.tasks)
        self.tasks = []

    def problems(self) -> list[str]:
        """The loops that failed and are not running again yet, or only for a moment."""
        now = time.monotonic()
        return sorted(name for name, back in self._failed.items() if now < back + SEEN_FOR)

    async def _keep(self, name: str, loop: Loop) -> None:
        pause = FIRST_PAUSE
        while True:
            started = time.monotonic()
            try:
                await loop()
                return  # a loop that ends by itself is done
            except Exception:
                if time.monotonic() - started > SEEN_FOR + pause:
                    pause = FIRST_PAUSE  # it had been running well: not a failing streak
                log.exception("background task %s failed; starting it again in %g s",
                              name, pause)
            self._failed[name] = time.monotonic() + pause
            await asyncio.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE)
