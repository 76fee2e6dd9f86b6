"""A relay as every worker of an installation sees it, shared through the store (both
backends): the failover to the backup relay and the way back, the alerts' view of a
failing relay, and the connection slots of ``max_connections`` handed round by
establishment. Each "worker" is its own :class:`RelayPool` with its own
:class:`SharedLimits` (its own holder) on the same store, as separate processes have;
the relays are real.

The shared view is read at most every ``health_refresh`` seconds; these pools read it at
every use (``health_refresh=0``) so that nothing waits for a clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from postier.core.crypto import SecretBox
from postier.core.service import Postier
from postier.core.settings import DeliverySettings, RelaySettings
from postier.delivery import pool as pool_module
from postier.delivery.attempt import deliver_one
from postier.delivery.limits import SharedLimits
from postier.delivery.pool import RelayPool
from postier.ops import alerts
from postier.server.config import ServerConfig
from postier.store.base import SENT, WAITER_STALE, Claimed, RecipientState, Store

from support.relay import FaultRelay


@pytest.fixture
def backup(relay_cert: tuple[Path, Path]) -> Iterator[FaultRelay]:
    with FaultRelay(cert=relay_cert) as r:
        yield r


def _relay(r: FaultRelay, **limits: int) -> RelaySettings:
    return RelaySettings(host=r.host, port=r.port, security="none", timeout=2, **limits)


def _pool(store: Store, **kw: float) -> RelayPool:
    # down_for=0: a relay that came back is tried at once, not a moment later.
    return RelayPool(concurrency=2, down_for=0.0,
                     limits=SharedLimits(store, health_refresh=0.0, **kw))


def _claimed(name: str, establishment: int = 1) -> Claimed:
    return Claimed(id=name, establishment_id=establishment, user_id=1,
                   envelope_from=f"ecole{establishment}@ac-lyon.fr",
                   data=f"Subject: {name}\r\n\r\nBonjour\r\n".encode(), smtputf8=False,
                   attempts=0, created_at=time.time(),
                   recipients=[RecipientState(0, "parent@example.org", "pending")])


def _subjects(r: FaultRelay) -> list[str]:
    return [m.message["Subject"] for m in r.messages]


async def _until(condition: object, what: str, timeout: float = 20) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"still not {what} after {timeout} s")


# -- failover ---------------------------------------------------------------------------------


async def test_a_worker_that_never_saw_the_main_relay_fail_fails_over_and_comes_back_with_the_others(  # noqa: E501
    store: Store, relay: FaultRelay, backup: FaultRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "PROBE_EVERY", 0.2)
    main = relay
    settings = DeliverySettings(relay=_relay(main), backup_relay=_relay(backup),
                                failover_after=60)
    # Worker A saw the main relay refuse connections a minute and a half ago (its clock
    # said so then; the store keeps since when).
    behind = [90.0]
    pool_a = RelayPool(concurrency=2, down_for=0.0, limits=SharedLimits(
        store, health_refresh=0.0, clock=lambda: time.time() - behind[0]))
    pool_b = _pool(store)
    main.down()
    tried = await pool_a.send(settings.relay, "ecole1@ac-lyon.fr", ["p@example.org"],
                              b"Subject: x\r\n\r\nx\r\n")
    assert tried.error is not None and tried.error.code == "refused"
    behind[0] = 0.0

    # Worker B never talked to the main relay: it sends through the backup at once.
    outcome = await deliver_one(_claimed("b-first"), settings, pool_b)
    assert outcome.status == SENT, outcome.attempt.detail
    assert outcome.attempt.relay == settings.backup_relay.describe()  # type: ignore[union-attr]
    assert _subjects(backup) == ["b-first"]
    assert pool_b.failing_for(settings.relay) == 0, "B itself never saw the main relay fail"

    # The main relay answers again; worker A's probe finds it: B comes back too, without
    # a probe or a failure of its own.
    main.up()

    async def recovered() -> bool:
        pool_a.probe_later(settings.relay)
        return await pool_b.failing_since(settings.relay) is None

    await _until(recovered, "seen answering again by worker B")
    outcome = await deliver_one(_claimed("b-back"), settings, pool_b)
    assert outcome.status == SENT and outcome.attempt.relay == settings.relay.describe()
    assert _subjects(main) == ["b-back"] and _subjects(backup) == ["b-first"]
    await pool_a.close()
    await pool_b.close()


async def test_failures_short_of_failover_after_keep_every_worker_on_the_main_relay(
    store: Store, relay: FaultRelay, backup: FaultRelay
) -> None:
    main = relay
    settings = DeliverySettings(relay=_relay(main), backup_relay=_relay(backup),
                                failover_after=3600)
    pool_a, pool_b = _pool(store), _pool(store)
    main.down()
    await pool_a.send(settings.relay, "ecole1@ac-lyon.fr", ["p@example.org"],
                      b"Subject: x\r\n\r\nx\r\n")
    assert await pool_b.failing_since(settings.relay) is not None, "B knows it fails"
    main.up()
    outcome = await deliver_one(_claimed("still-main"), settings, pool_b)
    assert outcome.status == SENT and _subjects(main) == ["still-main"]
    assert backup.messages == []
    # B found it answering: A, which saw it fail, knows it answers.
    assert await pool_a.failing_since(settings.relay) is None
    await pool_a.close()
    await pool_b.close()


async def test_another_password_for_the_same_account_failing_sends_nobody_else_to_the_backup(
    store: Store, relay_cert: tuple[Path, Path], backup: FaultRelay
) -> None:
    with FaultRelay(cert=relay_cert, auth={"college": "le-bon"}) as main:
        right = RelaySettings(host=main.host, port=main.port, security="none", timeout=2,
                              auth="password", username="college", password="le-bon")
        wrong = right.model_copy(update={"password": "un-autre"})
        mac = SecretBox(Fernet.generate_key()).mac  # the installation's key, as served
        pool_a = RelayPool(concurrency=1, limits=SharedLimits(
            store, health_refresh=0.0, mac=mac, clock=lambda: time.time() - 3600))
        pool_b = RelayPool(concurrency=1, limits=SharedLimits(store, health_refresh=0.0,
                                                              mac=mac))
        refused = await pool_a.send(wrong, "ecole1@ac-lyon.fr", ["p@example.org"],
                                    b"Subject: x\r\n\r\nx\r\n")
        assert refused.error is not None and refused.error.code == "auth_failed"
        settings = DeliverySettings(relay=right, backup_relay=_relay(backup),
                                    failover_after=60)
        outcome = await deliver_one(_claimed("own-password"), settings, pool_b)
        assert outcome.status == SENT and outcome.attempt.relay == right.describe()
        assert _subjects(main) == ["own-password"] and backup.messages == []
        await pool_a.close()
        await pool_b.close()


# -- the alerts' view -------------------------------------------------------------------------


@pytest.fixture
async def core(store_url: str, tmp_path: Path, relay: FaultRelay) -> AsyncIterator[Postier]:
    url = None if store_url.startswith("sqlite") else store_url
    c = Postier(ServerConfig(data_dir=tmp_path, database_url=url, hostname="ac-lyon.fr"))
    await c.open()
    admin = await c.add_user("direction", "direction@ac-lyon.fr", role="admin")
    await c.put_settings(admin, {
        "allowed_domains": ["ac-lyon.fr"],
        "relay": {"host": relay.host, "port": relay.port, "security": "none", "timeout": 2},
    })
    yield c
    await c.close()


async def test_a_relay_incident_is_opened_and_closed_by_a_worker_that_never_talked_to_it(
    core: Postier, relay: FaultRelay
) -> None:
    settings = await core.delivery_settings(1)
    pool_a = _pool(core.store)  # the worker that sends
    pool_b = _pool(core.store)  # another, with nothing to send through this relay
    engine_a = alerts.AlertEngine(core, pool_a)
    engine_b = alerts.AlertEngine(core, pool_b)
    relay.down()
    await pool_a.send(settings.relay, "ecole1@ac-lyon.fr", ["p@example.org"],
                      b"Subject: x\r\n\r\nx\r\n")
    later = time.time() + 3600

    raised = await engine_b.check(now=later)
    assert [(phase, i.kind) for phase, i in raised] == [("raised", "relay_failing")], (
        "the worker that never talked to the relay sees it failing as the other saw it")
    assert await engine_a.check(now=later) == [], "the same incident, not a second one"
    assert await engine_b.check(now=later + 30) == []

    relay.up()
    sent = await pool_a.send(settings.relay, "ecole1@ac-lyon.fr", ["p@example.org"],
                             b"Subject: y\r\n\r\ny\r\n")
    assert sent.error is None
    over = await engine_b.check(now=later + 60)
    assert [(phase, i.id) for phase, i in over] == [("resolved", raised[0][1].id)]
    assert await engine_a.check(now=later + 90) == []
    await pool_a.close()
    await pool_b.close()


async def test_a_worker_that_never_talked_to_a_relay_nobody_saw_fail_gives_no_opinion(
    core: Postier, relay: FaultRelay
) -> None:
    settings = await core.delivery_settings(1)
    pool = _pool(core.store)
    assert not await pool.known(settings.relay)
    assert await alerts.AlertEngine(core, pool)._relay(settings, time.time()) == alerts.UNKNOWN
    await pool.close()


# -- connection slots handed round ------------------------------------------------------------


async def test_a_free_slot_goes_to_the_establishment_holding_fewest_then_waiting_longest(
    store: Store,
) -> None:
    now = time.time()
    assert await store.take_relay_slot("r", 1, "A", now, 120, 1, queue=True) == 0
    # Worker A waits for a second connection for establishment 1, then worker B for
    # establishment 2: both in line.
    assert await store.take_relay_slot("r", 1, "A", now + 0.1, 120, 1, queue=True) is None
    assert await store.take_relay_slot("r", 1, "B", now + 0.2, 120, 2, queue=True) is None
    assert (await store.relay_health("h", now + 0.3, "r", "A")).waiting == {2}
    assert (await store.relay_health("h", now + 0.3, "r", "B")).waiting == {1}
    # A gives its slot back for the others: its own wait goes behind B's, although it
    # began earlier.
    await store.release_relay_slot("r", 0, "A", handed_round=now + 0.4)
    assert await store.take_relay_slot("r", 1, "A", now + 0.5, 120, 1, queue=True) is None
    assert await store.take_relay_slot("r", 1, "B", now + 0.6, 120, 2, queue=True) == 0
    assert (await store.relay_health("h", now + 0.7, "r", "A")).waiting == frozenset()
    await store.release_relay_slot("r", 0, "B")
    assert await store.take_relay_slot("r", 1, "A", now + 0.8, 120, 1, queue=True) == 0

    # Two slots: establishment 1 holds one; a free one goes to establishment 2 (holding
    # none), though establishment 1's other wait is older.
    assert await store.take_relay_slot("s", 2, "A", now, 120, 1, queue=True) == 0
    assert await store.take_relay_slot("s", 2, "C", now, 120, 3, queue=True) == 1
    assert await store.take_relay_slot("s", 2, "A", now + 0.1, 120, 1, queue=True) is None
    assert await store.take_relay_slot("s", 2, "B", now + 0.2, 120, 2, queue=True) is None
    await store.release_relay_slot("s", 1, "C")
    assert await store.take_relay_slot("s", 2, "A", now + 0.3, 120, 1, queue=True) is None
    assert await store.take_relay_slot("s", 2, "B", now + 0.4, 120, 2, queue=True) == 1

    # A waiter that stopped asking (its process died) holds nobody back.
    assert await store.take_relay_slot("t", 1, "D", now, 120, 4, queue=True) == 0
    assert await store.take_relay_slot("t", 1, "E", now, 120, 5, queue=True) is None
    await store.release_relay_slot("t", 0, "D")
    later = now + WAITER_STALE + 1
    assert await store.take_relay_slot("t", 1, "D", later, 120, 4, queue=True) == 0


async def test_a_flooding_establishment_hands_the_only_connection_round(
    store: Store, relay: FaultRelay
) -> None:
    relay.stall = ("after_data", 0.02)
    shared = _relay(relay, max_connections=1)
    pool_a, pool_b = _pool(store), _pool(store)

    async def flood() -> None:
        for i in range(60):
            await pool_a.send(shared, "ecole1@ac-lyon.fr", ["p@example.org"],
                              f"Subject: flood-{i}\r\n\r\nx\r\n".encode(), establishment=1)

    flooding = asyncio.create_task(flood())
    await relay.wait_for_async(3)  # worker A holds the only connection
    other = await pool_b.send(shared, "ecole2@ac-lyon.fr", ["p@example.org"],
                              b"Subject: other\r\n\r\nx\r\n", establishment=2)
    assert other.error is None, other.error
    await flooding
    order = _subjects(relay)
    assert order.index("other") < order.index("flood-59"), (
        f"establishment 2's e-mail waited for the whole flood: {order}")
    assert relay.max_sessions == 1
    await pool_a.close()
    await pool_b.close()
