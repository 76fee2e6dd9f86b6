"""Every fault a relay can show, against the real ``postier serve`` process.

One server, one establishment per fault, each with its own relay, so the whole matrix runs
at once: each establishment submits one e-mail (two recipients for the mixed case), its
relay misbehaves, and we watch the e-mail go to the state the fault calls for — deferred
with a transient code, or failed at once for a permanent (5xx) refusal — with the error
code a person reads in the queue. Then every fault is lifted, and every deferred e-mail
must be delivered: never lost, never twice, except in the one case SMTP cannot avoid (the
connection lost after the final dot while the relay kept the message; RFC 1047), which is
counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliability_kit import SilentAfterDotRelay, by_message_id, record_figures, wait_until

from postier.core.service import Postier
from postier.server.config import ServerConfig

from support.relay import FaultRelay
from support.server import ServerProcess

TIMEOUT = 2  # the relay timeout of every establishment, seconds
STALL = 4.5  # longer than TIMEOUT


@dataclass
class Case:
    name: str
    fault: Callable[[FaultRelay], None]
    first: str  # the status the fault leads to: deferred or failed
    code: str  # messages.last_error.code a person sees ("a|b": either)
    smtp_code: int | None = None
    tls: str = "none"
    final: str = "sent"
    copies: int = 1  # how many times the relay ends up with the e-mail
    recipients: tuple[str, ...] = ("parent@example.org",)
    lift: Callable[[FaultRelay], None] = field(default=lambda r: r.reset_faults())


def _set(**faults: Any) -> Callable[[FaultRelay], None]:
    def apply(relay: FaultRelay) -> None:
        for name, value in faults.items():
            setattr(relay, name, value)
    return apply


def _down(relay: FaultRelay) -> None:
    relay.down()


def _up(relay: FaultRelay) -> None:
    relay.up()


def _silent(relay: FaultRelay) -> None:
    assert isinstance(relay, SilentAfterDotRelay)
    relay.silent_after_dot = STALL
    relay.silent_once = True  # the retry is answered: two copies, however busy the machine


def _speak(relay: FaultRelay) -> None:
    assert isinstance(relay, SilentAfterDotRelay)
    relay.silent_after_dot = None


CASES = [
    Case("refused", _down, "deferred", "refused", lift=_up),
    Case("greeting-421", _set(greeting_reply="421 4.3.2 Service not available"),
         "deferred", "smtp_error", 421),
    Case("rcpt-450", _set(rcpt_reply_default="450 4.2.1 Mailbox busy"),
         "deferred", "smtp_error", 450),
    Case("rcpt-451", _set(rcpt_reply_default="451 4.3.0 Local error"),
         "deferred", "smtp_error", 451),
    Case("rcpt-452", _set(rcpt_reply_default="452 4.3.1 Insufficient system storage"),
         "deferred", "smtp_error", 452),
    Case("mail-550", _set(mail_reply="550 5.7.1 Sender not allowed"),
         "failed", "sender_refused", 550, final="failed", copies=0),
    Case("mail-451", _set(mail_reply="451 4.3.0 Try later"),
         "deferred", "sender_refused", 451),
    Case("rcpt-550", _set(rcpt_reply_default="550 5.1.1 No such user"),
         "failed", "recipient_refused", 550, final="failed", copies=0),
    Case("data-554", _set(data_reply="554 5.6.0 Message refused"),
         "failed", "rejected", 554, final="failed", copies=0),
    Case("data-451", _set(data_reply="451 4.3.0 Queue full"),
         "deferred", "smtp_error", 451),
    *[Case(f"stall-{step}", _set(stall=(step, STALL)), "deferred", "timeout")
      for step in ("connect", "ehlo", "mail", "rcpt", "data", "after_data")],
    Case("drop-during-data", _set(drop_during_data=True), "deferred", "disconnected"),
    Case("tls-handshake", _set(fail_tls_handshake=True), "deferred", "tls_failed",
         tls="starttls"),
    Case("tls-handshake-implicit", _set(fail_tls_handshake=True), "deferred", "tls_failed",
         tls="implicit"),
    # The relay keeps the e-mail and never answers the final dot: Postier cannot know it
    # was taken and sends it again — the documented possible duplicate.
    Case("silent-after-dot", _silent, "deferred", "timeout", lift=_speak, copies=2),
    # One recipient refused for good, the other for now: only the second is tried again.
    Case("mixed-550-451",
         _set(rcpt_replies={"refuse@example.org": "550 5.1.1 No such user",
                            "later@example.org": "451 4.2.0 Try later"}),
         # The first attempt reports the refusal, the next ones the recipient still waiting.
         "deferred", "recipient_refused|smtp_error", None,
         recipients=("refuse@example.org", "later@example.org")),
]


@dataclass
class Observed:
    case: Case
    relay: FaultRelay
    token: str
    message_id: str = ""
    first: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    copies: int = 0
    relay_recipients: list[list[str]] = field(default_factory=list)
    notices: int = 0


async def _provision(data_dir: Path, observed: dict[str, Observed]) -> None:
    core = Postier(ServerConfig(data_dir=data_dir))
    await core.open()
    try:
        for i, (name, obs) in enumerate(observed.items()):
            slug = f"f{i:02d}-{name}".replace("_", "-")[:60].rstrip("-")
            est = await core.add_establishment(slug, name)
            admin = await core.add_user("admin", f"admin@{slug}.fr", role="admin",
                                        establishment_id=est.id)
            obs.token, _ = await core.create_token(admin)
            security = {"none": "none", "starttls": "starttls", "implicit": "tls"}[obs.case.tls]
            await core.put_settings(admin, {
                "delegation": True,
                "sender": {"name": name, "address": f"noreply@{slug}.fr"},
                "allowed_domains": [f"{slug}.fr"],
                "relay": {"host": obs.relay.host, "port": obs.relay.port,
                          "security": security, "auth": "none", "timeout": TIMEOUT,
                          "verify_tls": False},
                "retry": {"first_delay": 1, "max_delay": 2, "max_age": 3600},
            })
    finally:
        await core.close()


def _get(server: ServerProcess, obs: Observed) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/api/v1/messages/{obs.message_id}", timeout=10,
                  headers={"Authorization": f"Bearer {obs.token}", "Accept-Language": "en"})
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory,
           relay_cert: tuple[Path, Path]) -> Iterator[dict[str, Observed]]:
    relays: list[FaultRelay] = []
    observed: dict[str, Observed] = {}
    for case in CASES:
        relay: FaultRelay = (SilentAfterDotRelay(cert=relay_cert) if case.name.startswith(
            "silent") else FaultRelay(cert=relay_cert, tls=case.tls))  # type: ignore[arg-type]
        relays.append(relay.start())
        observed[case.name] = Observed(case, relay, "")
    server = ServerProcess(tmp_path_factory.mktemp("matrix"))
    try:
        asyncio.run(_provision(server.data_dir, observed))
        server.start()
        for obs in observed.values():
            obs.case.fault(obs.relay)
        for obs in observed.values():
            r = httpx.post(f"{server.url}/api/v1/messages", timeout=10,
                           headers={"Authorization": f"Bearer {obs.token}"},
                           json={"to": list(obs.case.recipients), "subject": obs.case.name,
                                 "text": "Bonjour"})
            assert r.status_code == 202, r.text
            obs.message_id = r.json()["id"]

        def first_answers() -> bool:
            for obs in observed.values():
                if not obs.first:
                    m = _get(server, obs)
                    if m["attempts"] >= 1 and m["status"] in ("deferred", "failed", "sent"):
                        obs.first = m
            return all(o.first for o in observed.values())

        wait_until(first_answers, timeout=30, interval=0.2, what="a first attempt of each")
        for obs in observed.values():
            obs.case.lift(obs.relay)

        def final_answers() -> bool:
            for obs in observed.values():
                m = _get(server, obs)
                if m["status"] in ("sent", "failed", "cancelled"):
                    obs.final = m
            return all(o.final for o in observed.values())

        wait_until(final_answers, timeout=40, interval=0.2, what="a final state for each")
        time.sleep(STALL)  # anything sent twice, or late, arrives now
        for obs in observed.values():
            # Only this e-mail (a failure notice to its sender is another e-mail).
            mine = [m for m in obs.relay.messages
                    if str(m.message["Message-ID"]) == obs.final["message_id"]]
            obs.copies = by_message_id(mine)[obs.final["message_id"]]
            obs.relay_recipients = [sorted(m.rcpt_tos) for m in mine]
            obs.notices = len(obs.relay.messages) - len(mine)
        yield observed
    finally:
        server.kill()
        for relay in relays:
            relay.stop()
    record_figures(
        "fault matrix",
        faults=len(CASES),
        messages=len(CASES),
        lost=sum(1 for o in observed.values() if o.copies < o.case.copies),
        duplicates=sum(max(0, o.copies - 1) for o in observed.values()),
        expected_duplicates=sum(max(0, c.copies - 1) for c in CASES),
        failure_notices=sum(o.notices for o in observed.values()),
    )


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_fault_leads_to_the_right_state_and_code(matrix: dict[str, Observed], name: str) -> None:
    obs = matrix[name]
    first, case = obs.first, obs.case
    assert first["status"] == case.first, first
    seen = (first["attempts"], first["last_error"], first["recipients"])
    assert first["last_error"] is not None, seen
    assert first["last_error"]["code"] in case.code.split("|"), seen
    assert first["last_error"]["message"], "every failure says what happened"
    if case.smtp_code is not None:
        codes = [h["code"] for h in first["history"]] + [r["code"] for r in first["recipients"]]
        assert case.smtp_code in codes, first
    if case.first == "deferred":
        assert first["next_attempt_at"] is not None
    if name == "mixed-550-451":
        rcpts = {r["address"]: r for r in first["recipients"]}
        assert rcpts["refuse@example.org"]["status"] == "failed"
        assert rcpts["refuse@example.org"]["code"] == 550
        assert rcpts["later@example.org"]["status"] == "deferred"


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_fault_lifted_delivered_once_never_lost(matrix: dict[str, Observed], name: str) -> None:
    obs = matrix[name]
    assert obs.final["status"] == obs.case.final, obs.final
    assert obs.copies == obs.case.copies, (
        f"{obs.case.name}: the relay got the e-mail {obs.copies} times, "
        f"expected {obs.case.copies}")
    if name == "mixed-550-451":
        # The refused recipient failed at once; the other was tried again, alone.
        rcpts = {r["address"]: r for r in obs.final["recipients"]}
        assert rcpts["refuse@example.org"]["status"] == "failed"
        assert rcpts["later@example.org"]["status"] == "sent"
        assert obs.relay_recipients == [["later@example.org"]]
