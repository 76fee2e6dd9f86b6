"""Two ``postier worker`` processes on PostgreSQL agree on a relay: they fail over to the
backup relay together and come back together, and the only connection a relay allows
(``max_connections`` 1) goes round the establishments, across processes. Real relays;
each worker says a name of its own in EHLO, so the relays tell who sent what."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from postier.core.message import MessageIn
from postier.core.service import Postier
from postier.core.settings import RelaySettings
from postier.delivery.limits import HEALTH_REFRESH, SharedLimits
from postier.delivery.pool import RelayPool
from postier.server.config import ServerConfig
from postier.store.base import MessageRecord, User

from support.relay import FaultRelay
from support.workers import start_worker, stop_workers


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("POSTIER_SECRET_KEY", key)
    return {"POSTIER_SECRET_KEY": key}


@pytest.fixture
def backup(relay_cert: tuple[Path, Path]) -> Iterator[FaultRelay]:
    with FaultRelay(cert=relay_cert) as r:
        yield r


@pytest.fixture
async def core(pg_url: str, tmp_path: Path, env: dict[str, str]) -> AsyncIterator[Postier]:
    c = Postier(ServerConfig(data_dir=tmp_path, database_url=pg_url, hostname="ac-lyon.fr"))
    await c.open()
    yield c
    await c.close()


class Workers:
    def __init__(self, url: str, data_dir: Path, env: dict[str, str]) -> None:
        self.url, self.data_dir, self.env = url, data_dir, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    async def start(self, name: str) -> None:
        proc, log = start_worker(self.url, self.data_dir, name,
                                 {**self.env, "POSTIER_HOSTNAME": name})
        self.procs[name] = proc
        deadline = time.monotonic() + 30
        while "delivery worker" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        stop_workers(list(self.procs.values()))


@pytest.fixture
def workers(pg_url: str, tmp_path: Path, env: dict[str, str]) -> Iterator[Workers]:
    w = Workers(pg_url, tmp_path, env)
    yield w
    w.stop()


async def _send(core: Postier, user: User, subject: str) -> str:
    (accepted,) = await core.submit(user, [MessageIn.model_validate(
        {"to": ["parent@example.org"], "subject": subject, "text": "Bonjour"})])
    return accepted.id


def _who(relay: FaultRelay, subject: str) -> str | None:
    """The worker that sent ``subject`` through ``relay`` (its EHLO name)."""
    return next((m.helo for m in relay.messages if m.message["Subject"] == subject), None)


async def _arrives(subject: str, *relays: FaultRelay, timeout: float = 30) -> FaultRelay:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in relays:
            if _who(r, subject) is not None:
                return r
        await asyncio.sleep(0.02)
    raise AssertionError(f"{subject} never arrived")


async def _sent(core: Postier, mid: str) -> MessageRecord:
    """The e-mail once its worker recorded it sent (the relay has it a moment before)."""
    deadline = time.monotonic() + 30
    while True:
        record = await core.store.get_message(mid)
        if record is not None and record.status == "sent":
            return record
        assert time.monotonic() < deadline, f"{mid} is not recorded sent: {record}"
        await asyncio.sleep(0.02)


async def test_both_workers_send_through_the_backup_and_come_back_together(
    core: Postier, workers: Workers, relay: FaultRelay, backup: FaultRelay
) -> None:
    main = relay
    admin = await core.add_user("direction", "direction@ac-lyon.fr", role="admin")
    await core.put_settings(admin, {
        "allowed_domains": ["ac-lyon.fr"],
        "relay": {"host": main.host, "port": main.port, "security": "none", "timeout": 5},
        "backup_relay": {"host": backup.host, "port": backup.port, "security": "none",
                         "timeout": 5},
        "failover_after": 2,
        "retry": {"first_delay": 1, "max_delay": 1},
    })
    main.down()
    await workers.start("worker-a")
    await _send(core, admin, "first")
    assert await _arrives("first", backup, main) is backup
    assert _who(backup, "first") == "worker-a"

    # Worker B starts: it never saw the main relay fail, yet sends through the backup at
    # its first attempt.
    await workers.start("worker-b")
    by_b: list[str] = []
    for i in range(60):
        subject = f"down-{i}"
        mid = await _send(core, admin, subject)
        assert await _arrives(subject, backup, main) is backup
        record = await _sent(core, mid)
        assert record.attempts == 1, (
            f"{subject} was first tried on the dead main relay by {_who(backup, subject)}")
        if _who(backup, subject) == "worker-b":
            by_b.append(subject)
            if len(by_b) == 2:
                break
    assert by_b, "worker B took none of the e-mails"

    # The main relay answers again: once a probe (either worker's) found it, both send
    # through it.
    main.up()
    for i in range(200):
        subject = f"back-{i}"
        await _send(core, admin, subject)
        if await _arrives(subject, backup, main) is main:
            break
    else:
        raise AssertionError("the e-mails never went back to the main relay")
    # Not a guess at how fast anything runs: each worker's view of the relay is at most
    # HEALTH_REFRESH seconds old, by construction; past that, both know it answers.
    await asyncio.sleep(HEALTH_REFRESH + 0.05)
    senders: set[str | None] = set()
    for i in range(60):
        subject = f"after-{i}"
        await _send(core, admin, subject)
        assert await _arrives(subject, backup, main) is main, (
            f"{subject} went through the backup ({_who(backup, subject)}) although the "
            "main relay was found answering")
        senders.add(_who(main, subject))
        if senders == {"worker-a", "worker-b"}:
            break
    assert senders == {"worker-a", "worker-b"}


async def test_the_only_connection_goes_round_the_establishments_across_workers(
    core: Postier, workers: Workers, relay: FaultRelay
) -> None:
    relay.stall = ("after_data", 0.03)
    shared = {"host": relay.host, "port": relay.port, "security": "none", "timeout": 5,
              "max_connections": 1}
    flooder = await core.add_user("direction", "direction@ac-lyon.fr", role="admin")
    await core.put_settings(flooder, {"allowed_domains": ["ac-lyon.fr"], "relay": shared})
    await core.submit(flooder, [MessageIn.model_validate(
        {"to": ["parent@example.org"], "subject": f"flood-{i}", "text": "Bonjour"})
        for i in range(100)])
    # Worker A drains establishment 1's flood through the relay's only connection.
    await workers.start("worker-a")
    await relay.wait_for_async(3, timeout=30)
    # Another process (here, this test's own relay pool, its own holder in the store)
    # has an e-mail of establishment 2 for the same relay account.
    other = RelayPool(concurrency=1, limits=SharedLimits(core.store))
    result = await other.send(RelaySettings.model_validate(shared), "ecole2@ac-lyon.fr",
                              ["parent@example.org"], b"Subject: other\r\n\r\nBonjour\r\n",
                              establishment=2)
    assert result.error is None, result.error
    await relay.wait_for_async(101, timeout=60)
    await other.close()
    order = [m.message["Subject"] for m in relay.messages]
    after = len(order) - 1 - order.index("other")
    assert after >= 10, (
        f"establishment 2's e-mail waited for (nearly) the whole flood: {order}")
    assert relay.max_sessions == 1
