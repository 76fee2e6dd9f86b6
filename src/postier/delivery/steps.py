"""The steps of a conversation with a relay, as the test-send watches them.

The test-send passes an ``on_step`` callback (:data:`StepCallback`); delivery passes none,
and then nothing is timed nor reported. :class:`ConnectionSteps` reports the steps of
opening a connection, :class:`TransactionSteps` those of sending one e-mail on it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence

from postier.core.settings import RelaySettings
from postier.delivery.classify import classify
from postier.delivery.session import Reply

# A step's name, whether it went well, its duration in ms and its detail (the relay's
# reply, or what went wrong).
StepCallback = Callable[[str, bool, int, str], None]


def elapsed_ms(start: float) -> int:
    """Milliseconds since ``start`` (a :func:`time.perf_counter` reading)."""
    return int((time.perf_counter() - start) * 1000)


class ConnectionSteps:
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
                self.on_step(name, False, elapsed_ms(start), err.reply or str(exc))
            raise err from exc
        if self.on_step:
            self.on_step(name, True, elapsed_ms(start), " ".join(detail))


class TransactionSteps:
    """The steps of a transaction for the test-send's ``on_step`` (nothing without it)."""

    def __init__(self, on_step: StepCallback | None) -> None:
        self.on_step = on_step
        self.mark = time.perf_counter()

    def __call__(self, step: str, ok: bool, detail: str) -> None:
        if self.on_step is not None:
            self.on_step(step, ok, elapsed_ms(self.mark), detail)
            self.mark = time.perf_counter()

    def replies(self, mail: Sequence[Reply], rcpts: Sequence[Reply]) -> None:
        """The sender's and the recipients' replies received so far."""
        if self.on_step is None:
            return
        for step, (code, text) in [*(("mail_from", r) for r in mail),
                                   *(("rcpt_to", r) for r in rcpts)]:
            ok = code == 250 or (step == "rcpt_to" and code == 251)
            self(step, ok, f"{code} {text}")
