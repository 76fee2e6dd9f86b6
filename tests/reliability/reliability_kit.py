"""Helpers shared by the reliability campaign (``tests/reliability``).

Kept beside the tests rather than in ``tests/support`` so the campaign is self-contained:
a relay that takes a message and then says nothing, counters of what a relay received,
a look into the server's SQLite store, and the figures every scenario reports.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

from support.relay import FaultRelay, Received, _FaultSMTP, _Handler
from support.server import ServerProcess

# -- figures ---------------------------------------------------------------------------------

FIGURES: list[dict[str, Any]] = []


def record_figures(scenario: str, **numbers: Any) -> None:
    """Keep a scenario's numbers for the end-of-run summary (and ``docs/reliability.md``).

    With ``POSTIER_RELIABILITY_FIGURES=path`` they are also appended to that JSON-lines
    file, which is how ``bench/soak.py`` and the documentation collect them."""
    entry = {"scenario": scenario, **numbers}
    FIGURES.append(entry)
    path = os.environ.get("POSTIER_RELIABILITY_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")


# -- what a relay received -------------------------------------------------------------------


def by_message_id(messages: Iterable[Received]) -> collections.Counter[str]:
    """How many times each e-mail (its Message-ID, stable across retries) arrived."""
    return collections.Counter(str(m.message["Message-ID"]) for m in messages)


def duplicates(counts: collections.Counter[str]) -> int:
    return sum(n - 1 for n in counts.values() if n > 1)


class SilentAfterDotRelay(FaultRelay):
    """A relay that, when ``silent_after_dot`` is set, *keeps* the message after the final
    dot and then answers nothing for that many seconds: the one case where SMTP cannot
    tell the client whether the message was taken (RFC 1047), so a retry may duplicate it.

    (``FaultRelay.stall = ("after_data", s)`` stalls *before* recording, and aiosmtpd
    forgets the message when the client hangs up, so it cannot show that case.)"""

    silent_after_dot: float | None = None
    # Silent for one message only: the next is answered, however soon it comes (a test
    # then knows the copies to expect without racing the retry).
    silent_once = False

    def _protocol_factory(self) -> _FaultSMTP:
        proto = super()._protocol_factory()
        relay = self
        base = _Handler(self)

        class _Keeping(_Handler):
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                silence = relay.silent_after_dot
                if silence is None:
                    return await base.handle_DATA(server, session, envelope)
                if relay.silent_once:
                    relay.silent_after_dot = None
                relay._record(Received(
                    mail_from=str(envelope.mail_from), rcpt_tos=list(envelope.rcpt_tos),
                    data=bytes(envelope.original_content), peer=session.peer,
                    auth_user=None, at=time.time()))
                await asyncio.sleep(silence)
                return "250 2.0.0 OK queued (too late)"

        proto._handle_hooks["DATA"] = _Keeping(self).handle_DATA
        return proto


# -- the server's store ----------------------------------------------------------------------


@contextlib.contextmanager
def database(data_dir: Path, timeout: float = 10) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(data_dir / "postier.db", timeout=timeout, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def statuses(data_dir: Path) -> dict[str, int]:
    with database(data_dir) as db:
        return dict(db.execute("SELECT status, count(*) FROM messages GROUP BY status"))


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last: {value!r})")
        time.sleep(interval)


# -- load ------------------------------------------------------------------------------------


class Submitter(threading.Thread):
    """Submits e-mails over HTTP as fast as one client can, until stopped; remembers the
    Message-IDs of those acknowledged with 202 (what the server promised to deliver) and
    counts the requests that got no answer or a refusal (nothing was promised)."""

    def __init__(self, url: str, token: str, *, batch: int = 1, prefix: str = "m",
                 pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.token = token
        self.batch = batch
        self.prefix = prefix
        self.pause = pause
        self.acknowledged: dict[str, str] = {}  # Postier id -> subject
        self.unanswered = 0
        self.refused: collections.Counter[int] = collections.Counter()
        self.stop_event = threading.Event()
        self.n = 0

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=5) as c:
            while not self.stop_event.is_set():
                subjects = [f"{self.prefix}-{self.n + i}" for i in range(self.batch)]
                self.n += self.batch
                msgs = [{"to": [f"{s}@example.org"], "subject": s, "text": "Bonjour"}
                        for s in subjects]
                try:
                    if self.batch == 1:
                        r = c.post("/api/v1/messages", json=msgs[0])
                        answers = [r.json()] if r.status_code == 202 else []
                    else:
                        r = c.post("/api/v1/messages/batch", json={"messages": msgs})
                        answers = r.json()["messages"] if r.status_code == 202 else []
                except (httpx.HTTPError, ValueError):
                    self.unanswered += 1
                    time.sleep(0.05)
                    continue
                if r.status_code != 202:
                    self.refused[r.status_code] += 1
                    time.sleep(0.05)
                    continue
                for subject, answer in zip(subjects, answers, strict=True):
                    self.acknowledged[answer["id"]] = subject
                if self.pause:
                    time.sleep(self.pause)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(15)


def subjects(messages: Iterable[Received]) -> collections.Counter[str]:
    return collections.Counter(str(m.message["Subject"]) for m in messages)


def wait_delivered(relay: Any, wanted: set[str], timeout: float,
                   what: str = "every acknowledged e-mail delivered") -> None:
    """Wait until an e-mail of each subject in ``wanted`` reached ``relay``, parsing each
    received e-mail once. (Polling ``subjects(relay.messages)`` parses all of them at
    every look: with thousands received, that starves the relay's thread, which shares
    this process, and the drain slows to a crawl.)"""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    done = 0
    while True:
        messages = relay.messages
        seen.update(str(m.message["Subject"]) for m in messages[done:])
        done = len(messages)
        missing = wanted - seen
        if not missing:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{what} not reached within {timeout} s: {len(missing)} "
                                 f"of {len(wanted)} missing, e.g. {sorted(missing)[:5]}")
        with contextlib.suppress(AssertionError):  # nothing new within the second
            relay.wait_for(done + 1, timeout=min(left, 1.0))


def quick_retry(server: ServerProcess, relay: Any, timeout: int = 5, **extra: Any) -> None:
    server.configure_relay(
        relay,
        relay={"host": relay.host, "port": relay.port, "security": "none", "auth": "none",
               "timeout": timeout},
        retry={"first_delay": 1, "max_delay": 2, "max_age": 3600},
        **extra,
    )
