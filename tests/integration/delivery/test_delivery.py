"""The delivery engine against a real SMTP relay: store + worker + relay pool, in process.

Each test stores messages in a real SQLite queue, runs a real worker, and checks what a
real relay (support.relay.FaultRelay) received and what the queue says about each message.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from postier.core.settings import DeliverySettings, RelaySettings, RetrySettings
from postier.delivery.limits import SharedLimits
from postier.delivery.pool import RelayPool
from postier.delivery.worker import DeliveryWorker
from postier.store import create_store
from postier.store.base import NewMessage, Store

from support.relay import FaultRelay

RAW = (
    b"From: Alice <alice@ac-lyon.fr>\r\nTo: parents@example.org\r\n"
    b"Subject: Conseil de classe\r\nMessage-ID: <m1@test>\r\n\r\nBonjour.\r\n"
)


class Engine:
    def __init__(self, store: Store, settings: DeliverySettings) -> None:
        self.store = store
        self.settings = settings
        self.worker: DeliveryWorker | None = None
        self._n = 0

    async def settings_for(self, _est: int) -> DeliverySettings:
        return self.settings

    async def start(self, **kw: Any) -> DeliveryWorker:
        self.worker = DeliveryWorker(
            self.store,
            self.settings_for,
            pool=RelayPool(concurrency=kw.pop("concurrency", 4), down_for=0.2,
                           limits=SharedLimits(self.store)),
            poll_interval=kw.pop("poll_interval", 0.05),
            **kw,
        )
        await self.worker.start()
        return self.worker

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.stop(grace=5)
            self.worker = None

    async def put(self, *recipients: str, data: bytes = RAW, key: str | None = None) -> str:
        self._n += 1
        mid = f"{time.time_ns():020d}{self._n:012d}"
        (res,) = await self.store.enqueue(
            [
                NewMessage(
                    id=mid, establishment_id=1, user_id=1, priority=0,
                    envelope_from="alice@ac-lyon.fr", header_from="Alice <alice@ac-lyon.fr>",
                    message_id="<m1@test>", subject="Conseil de classe", data=data,
                    recipients=list(recipients or ("parents@example.org",)),
                    idempotency_key=key,
                )
            ]
        )
        if self.worker:
            self.worker.notify()
        return res.id

    async def wait(self, mid: str, status: str, timeout: float = 10.0) -> Any:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        rec = None
        while time.monotonic() < deadline:
            rec = await self.store.get_message(mid)
            if rec is not None and rec.status == status:
                return rec
            await asyncio.sleep(0.05)
        raise AssertionError(f"message {mid} is not {status} after {timeout} s: {rec}")


def _settings(relay: FaultRelay, **relay_kw: Any) -> DeliverySettings:
    return DeliverySettings(
        relay=RelaySettings(host=relay.host, port=relay.port, security="none", timeout=2,
                            **relay_kw),
        retry=RetrySettings(first_delay=1, max_delay=1, max_age=3600),
    )


@pytest.fixture
async def engine(store_url: str, relay: FaultRelay) -> AsyncIterator[Engine]:
    store = create_store(store_url)
    await store.open()
    eng = Engine(store, _settings(relay))
    yield eng
    await eng.stop()
    await store.close()


async def test_message_reaches_relay_unchanged(engine: Engine, relay: FaultRelay) -> None:
    await engine.start()
    mid = await engine.put("parents@example.org", "prof@ac-lyon.fr")
    rec = await engine.wait(mid, "sent")
    (got,) = await relay.wait_for_async(1)
    assert got.mail_from == "alice@ac-lyon.fr"
    assert sorted(got.rcpt_tos) == ["parents@example.org", "prof@ac-lyon.fr"]
    assert got.data.replace(b"\r\n", b"\n") == RAW.replace(b"\r\n", b"\n")
    assert [r.status for r in rec.recipients] == ["sent", "sent"]
    assert rec.attempts == 1 and rec.history[0].outcome == "sent"


def _count_claims(store: Store, during_first: Any = None) -> list[int]:
    """How many e-mails each claim of ``store`` returned; ``during_first`` runs inside the
    first claim, after its statement (what another process does at that moment)."""
    claims: list[int] = []
    real_claim = store.claim

    async def claim(*args: Any, **kwargs: Any) -> Any:
        got = await real_claim(*args, **kwargs)
        claims.append(len(got))
        if len(claims) == 1 and during_first is not None:
            await during_first()
        return got

    store.claim = claim  # type: ignore[method-assign]
    return claims


async def test_a_worker_with_free_slots_claims_when_woken_not_after_each_delivery(
    engine: Engine, relay: FaultRelay
) -> None:
    # No polling during the test: every claim is a wake-up's. Before, each delivery that
    # ended woke the worker for a claim that found nothing: a database round trip for
    # every e-mail, which halved the PostgreSQL relay's throughput.
    claims = _count_claims(engine.store)
    await engine.start(poll_interval=30)
    for _ in range(12):
        await engine.wait(await engine.put(), "sent")
    assert len(relay.messages) == 12
    assert len(claims) <= 12 + 2, claims  # one per e-mail stored, and the first at start


async def test_an_e_mail_stored_while_a_claim_runs_is_claimed_at_once(
    engine: Engine, relay: FaultRelay
) -> None:
    stored: list[str] = []
    done = asyncio.Event()

    async def store_one() -> None:
        stored.append(await engine.put())  # and wakes the worker, mid-claim
        done.set()

    _count_claims(engine.store, during_first=store_one)
    await engine.start(poll_interval=30)  # a lost wake-up would wait 30 s
    await asyncio.wait_for(done.wait(), 5)
    await engine.wait(stored[0], "sent", timeout=5)


async def test_a_busy_worker_takes_a_burst_of_e_mails_in_few_claims(
    engine: Engine, relay: FaultRelay
) -> None:
    # Each claim is a transaction: three workers on PostgreSQL claiming at every e-mail
    # accepted cost more than the e-mails themselves. A worker with deliveries in flight
    # waits a moment (claim_gather) after a wake-up, so that one claim takes what came
    # meanwhile. An idle worker claims at once.
    relay.stall = ("after_data", 1.0)  # slow enough to stay busy through the burst
    claims = _count_claims(engine.store)
    await engine.start(poll_interval=30, claim_gather=0.05)
    first = await engine.put()
    for _ in range(1000):  # the idle worker takes it without waiting
        if claims and claims[-1] == 1:
            break
        await asyncio.sleep(0.005)
    before = len(claims)
    burst = []
    for _ in range(10):  # ten e-mails over about 30 ms, each waking the worker
        burst.append(await engine.put())
        await asyncio.sleep(0.003)
    for mid in [first, *burst]:
        await engine.wait(mid, "sent")
    assert sum(claims[before:]) == 10
    assert len(claims) - before <= 4, claims  # ten claims without the wait
    assert len(relay.messages) == 11


async def test_relay_down_then_up_delivers_each_message_once(
    engine: Engine, relay: FaultRelay
) -> None:
    relay.down()
    await engine.start()
    ids = [await engine.put(f"eleve{i}@example.org") for i in range(20)]
    # While the relay is down, nothing is lost and every message says why it waits.
    rec = await engine.wait(ids[0], "deferred")
    err = json.loads(rec.last_error)
    assert err["code"] == "refused", err
    relay.up()
    for mid in ids:
        await engine.wait(mid, "sent", timeout=15)
    got = relay.messages
    assert sorted(r for m in got for r in m.rcpt_tos) == sorted(
        f"eleve{i}@example.org" for i in range(20)
    ), "every message exactly once"


async def test_permanent_failure_for_one_recipient_others_sent_once(
    engine: Engine, relay: FaultRelay
) -> None:
    relay.rcpt_replies = {"inconnu@example.org": "550 5.1.1 No such user"}
    await engine.start()
    mid = await engine.put("a@example.org", "inconnu@example.org", "b@example.org")
    rec = await engine.wait(mid, "sent")
    by = {r.address: r for r in rec.recipients}
    assert by["inconnu@example.org"].status == "failed"
    assert by["inconnu@example.org"].code == 550
    assert "No such user" in (by["inconnu@example.org"].reply or "")
    assert by["a@example.org"].status == by["b@example.org"].status == "sent"
    await asyncio.sleep(1.5)  # past a retry delay: nothing is sent again
    assert len(relay.messages) == 1
    assert sorted(relay.messages[0].rcpt_tos) == ["a@example.org", "b@example.org"]


async def test_transient_failure_retries_only_the_waiting_recipient(
    engine: Engine, relay: FaultRelay
) -> None:
    relay.rcpt_replies = {"plein@example.org": "452 4.2.2 Mailbox full"}
    await engine.start()
    mid = await engine.put("a@example.org", "plein@example.org")
    rec = await engine.wait(mid, "deferred")
    assert {r.address: r.status for r in rec.recipients} == {
        "a@example.org": "sent", "plein@example.org": "deferred",
    }
    relay.rcpt_replies = {}
    rec = await engine.wait(mid, "sent", timeout=10)
    rcpts = [r for m in relay.messages for r in m.rcpt_tos]
    assert sorted(rcpts) == ["a@example.org", "plein@example.org"], "a@ must not get it twice"
    assert rec.attempts == 2


async def test_all_recipients_refused_fails_message(engine: Engine, relay: FaultRelay) -> None:
    relay.rcpt_reply_default = "550 5.1.1 No such user"
    await engine.start()
    mid = await engine.put("x@example.org")
    rec = await engine.wait(mid, "failed")
    assert json.loads(rec.last_error)["code"] == "recipient_refused"


async def test_message_gives_up_after_max_age(engine: Engine, relay: FaultRelay) -> None:
    engine.settings = engine.settings.model_copy(
        update={"retry": RetrySettings(first_delay=1, max_delay=1, max_age=60)}
    )
    relay.rcpt_reply_default = "451 4.3.0 Try again later"
    mid = await engine.put("x@example.org")
    # Make the message older than its maximum age, as if the relay had refused for days.
    from sqlalchemy import update

    from postier.store import schema

    async with engine.store.write_engine.begin() as conn:  # type: ignore[attr-defined]
        await conn.execute(
            update(schema.messages).where(schema.messages.c.id == mid)
            .values(created_at=time.time() - 120)
        )
    await engine.start()
    rec = await engine.wait(mid, "failed")
    err = json.loads(rec.last_error)
    assert err["code"] == "expired" and "451" in err["params"]["reason"]
    assert rec.recipients[0].status == "failed"


async def test_stalled_relay_times_out_and_is_retried(engine: Engine, relay: FaultRelay) -> None:
    relay.stall = ("data", 30.0)
    await engine.start()
    t0 = time.monotonic()
    mid = await engine.put("x@example.org")
    rec = await engine.wait(mid, "deferred", timeout=10)
    assert time.monotonic() - t0 < 8, "the 2 s timeout bounds the attempt"
    assert json.loads(rec.last_error)["code"] == "timeout"
    relay.stall = None
    await engine.wait(mid, "sent", timeout=10)


async def test_connections_are_reused(engine: Engine, relay: FaultRelay) -> None:
    await engine.start(concurrency=2)
    ids = [await engine.put(f"p{i}@example.org") for i in range(30)]
    for mid in ids:
        await engine.wait(mid, "sent")
    assert len(relay.messages) == 30
    assert relay.connections <= 4, f"{relay.connections} connections for 30 messages"


async def test_expired_lease_returns_message_to_queue(engine: Engine, relay: FaultRelay) -> None:
    mid = await engine.put("x@example.org")
    # A worker that claimed the message and died: its lease runs out.
    claimed = await engine.store.claim("dead-worker", 10, lease_seconds=0.5, now=time.time())
    assert [c.id for c in claimed] == [mid]
    await engine.start()
    await asyncio.sleep(0.1)
    assert (await engine.store.get_message(mid)).status == "sending"
    await asyncio.sleep(0.6)
    assert await engine.store.release_expired_leases(time.time()) == 1
    engine.worker.notify()  # type: ignore[union-attr]
    await engine.wait(mid, "sent")
    assert len(relay.messages) == 1


async def test_auth_relay_with_password(store_url: str, auth_relay: FaultRelay) -> None:
    store = create_store(store_url)
    await store.open()
    eng = Engine(store, _settings(auth_relay, auth="password", username="teacher",
                                  password="s3cret"))
    try:
        await eng.start()
        mid = await eng.put("x@example.org")
        await eng.wait(mid, "sent")
        assert auth_relay.messages[0].auth_user == "teacher"
        eng.settings = _settings(auth_relay, auth="password", username="teacher",
                                 password="wrong")
        mid = await eng.put("y@example.org")
        rec = await eng.wait(mid, "deferred")
        assert json.loads(rec.last_error)["code"] == "auth_failed"
    finally:
        await eng.stop()
        await store.close()


async def test_idempotency_key_stores_once(engine: Engine) -> None:
    a = await engine.put("x@example.org", key="convocation-42")
    b = await engine.put("x@example.org", key="convocation-42")
    assert a == b
    assert (await engine.store.counts())["queued"] == 1


async def test_graceful_stop_returns_in_flight_to_queue(
    engine: Engine, relay: FaultRelay
) -> None:
    relay.stall = ("data", 30.0)
    await engine.start()
    mid = await engine.put("x@example.org")
    await engine.wait(mid, "sending")
    await asyncio.sleep(0.2)
    assert engine.worker is not None
    await engine.worker.stop(grace=0.2)
    engine.worker = None
    rec = await engine.store.get_message(mid)
    assert rec.status == "deferred", "an interrupted delivery goes back to the queue"


async def test_restart_releases_every_lease_as_due_now(engine: Engine, relay: FaultRelay) -> None:
    """What `postier serve` does at start-up on the embedded store: the previous process
    died mid-delivery; its messages must go out at once, not after their lease."""
    mid = await engine.put("x@example.org")
    await engine.store.claim("crashed", 10, lease_seconds=3600, now=time.time())
    assert await engine.store.release_expired_leases(time.time(), everything=True) == 1
    rec = await engine.store.get_message(mid)
    assert rec.status == "deferred" and rec.next_attempt_at <= time.time()
    await engine.start()
    await engine.wait(mid, "sent", timeout=3)


async def test_rate_limit_reply_pauses_the_relay_without_counting_attempts(
    store_url: str, relay: FaultRelay
) -> None:
    store = create_store(store_url)
    await store.open()
    eng = Engine(store, _settings(relay))
    relay.mail_reply = "421 4.7.0 Message submission rate for this client has exceeded"
    try:
        eng.worker = DeliveryWorker(store, eng.settings_for, poll_interval=0.05,
                                    pool=RelayPool(concurrency=2, down_for=0.2,
                                                   rate_pause=1.5,
                                                   limits=SharedLimits(store)))
        await eng.worker.start()
        ids = [await eng.put(f"p{i}@example.org") for i in range(6)]
        first = await eng.wait(ids[0], "deferred")
        assert json.loads(first.last_error)["code"] == "rate_limited"
        assert first.attempts == 0, "slowing down is not a failure of the e-mail"
        knocks = relay.connections
        await asyncio.sleep(0.8)
        assert relay.connections == knocks, "paused: no new connection to the relay"
        relay.mail_reply = None
        for mid in ids:
            await eng.wait(mid, "sent", timeout=15)
    finally:
        await eng.stop()
        await store.close()
    assert len(relay.messages) == 6


async def test_max_per_minute_paces_the_relay(store_url: str, relay: FaultRelay) -> None:
    store = create_store(store_url)
    await store.open()
    eng = Engine(store, _settings(relay, max_per_minute=240))  # one every 0.25 s
    try:
        # One connection: after the first conversation (which also opens it), every one
        # takes the same short time, so arrivals are spaced like starts.
        await eng.start(concurrency=1)
        for i in range(6):
            await eng.put(f"p{i}@example.org")
        got = await relay.wait_for_async(6, timeout=15)
    finally:
        await eng.stop()
        await store.close()
    times = sorted(m.at for m in got)
    # Starts 0.25 s apart: the last four gaps span at least a second (a busy machine only
    # spreads them more); unpaced, they would take a few milliseconds.
    assert times[-1] - times[1] >= 0.85, f"sent faster than the relay's limit: {times}"


async def test_backup_relay_takes_over_then_hands_back(store_url: str, relay: FaultRelay) -> None:
    store = create_store(store_url)
    await store.open()
    with FaultRelay() as backup:
        main_settings = _settings(relay)
        eng = Engine(store, main_settings.model_copy(update={
            "backup_relay": RelaySettings(host=backup.host, port=backup.port,
                                          security="none", timeout=2),
            "failover_after": 1,
        }))
        try:
            relay.down()
            await eng.start()
            first = await eng.put("a@example.org")
            rec = await eng.wait(first, "sent", timeout=15)
            assert rec.history[0].relay == f"{relay.host}:{relay.port}"
            assert rec.history[-1].relay == f"{backup.host}:{backup.port}", rec.history
            assert len(backup.messages) == 1 and relay.messages == []
            # The main relay answers again: the background check notices, and new e-mails
            # go through it.
            relay.up()
            deadline = time.monotonic() + 15
            while eng.worker.pool.failing_for(main_settings.relay) > 0:  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the main relay was never checked again"
                await eng.put("probe@example.org")
                await asyncio.sleep(0.5)
            later = await eng.put("b@example.org")
            rec = await eng.wait(later, "sent")
            assert rec.history[-1].relay == f"{relay.host}:{relay.port}"
        finally:
            await eng.stop()
            await store.close()


async def test_permanent_refusal_is_never_fixed_by_failover(
    store_url: str, relay: FaultRelay
) -> None:
    store = create_store(store_url)
    await store.open()
    with FaultRelay() as backup:
        relay.rcpt_reply_default = "550 5.1.1 No such user"
        eng = Engine(store, _settings(relay).model_copy(update={
            "backup_relay": RelaySettings(host=backup.host, port=backup.port,
                                          security="none", timeout=2),
            "failover_after": 1,
        }))
        try:
            await eng.start()
            for i in range(3):
                mid = await eng.put(f"x{i}@example.org")
                await eng.wait(mid, "failed")
                await asyncio.sleep(0.6)
            assert backup.messages == [] and backup.connections == 0
        finally:
            await eng.stop()
            await store.close()


async def test_recipient_level_slow_down_is_not_a_failure(
    engine: Engine, relay: FaultRelay
) -> None:
    relay.rcpt_reply_default = ("450 4.2.1 The user you are trying to contact is receiving "
                                "mail at a rate that prevents additional messages")
    await engine.start()
    mid = await engine.put("busy@example.org")
    rec = await engine.wait(mid, "deferred")
    assert json.loads(rec.last_error)["code"] == "rate_limited"
    assert rec.attempts == 0, "a slow-down is not counted against the e-mail"


async def test_quitting_a_slow_relays_idle_connections_never_costs_a_lease(
    store_url: str, relay: FaultRelay, relay_cert: Any
) -> None:
    """Idle connections to a relay slow to answer QUIT are closed beside the heartbeat, not
    in it: another establishment's slow delivery keeps its lease meanwhile, so a second
    worker never takes it over and sends it again."""
    slow_quit, slow_data = relay, FaultRelay(cert=relay_cert).start()
    store = create_store(store_url)
    await store.open()
    patient = _settings(slow_data)
    patient = patient.model_copy(update={"relay": patient.relay.model_copy(
        update={"timeout": 10})})
    settings = {1: _settings(slow_quit), 2: patient}

    async def settings_for(est: int) -> DeliverySettings:
        return settings[est]

    def worker() -> DeliveryWorker:
        return DeliveryWorker(
            store, settings_for, pool=RelayPool(concurrency=4, down_for=0.2, idle_timeout=0.2),
            poll_interval=0.05, lease_seconds=2.0)

    first, second = worker(), worker()
    eng = Engine(store, settings[1])
    eng.worker = first
    await first.start()
    try:
        # Four connections to the first relay, idle once their e-mails are sent...
        for mid in [await eng.put(f"p{i}@example.org") for i in range(4)]:
            await eng.wait(mid, "sent")
        slow_quit.stall = ("quit", 1.9)  # ...whose QUIT takes ~2 s each to answer.
        slow_data.stall = ("after_data", 4.0)  # Twice the lease.
        (res,) = await store.enqueue([NewMessage(
            id=f"{time.time_ns():032d}", establishment_id=2, user_id=1, priority=0,
            envelope_from="direction@lyceeduparc.fr", header_from="", message_id="<m2@test>",
            subject="Lent", data=RAW, recipients=["parent@example.org"])])
        first.notify()
        await eng.wait(res.id, "sending")
        await second.start()  # a worker that takes over any lease the first one lets go
        await eng.wait(res.id, "sent", timeout=30)
        assert len(slow_data.messages) == 1, "the slow delivery was sent twice: lease lost"
    finally:
        await second.stop(grace=5)
        await first.stop(grace=5)
        await store.close()
        slow_data.stop()


async def test_an_email_claimed_during_a_lease_renewal_keeps_its_lease(
    engine: Engine, relay: FaultRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """The heartbeat renews the leases it asked for: e-mails claimed while a renewal was
    under way are not taken for lost (they were left to the queue for a whole lease)."""
    store = engine.store
    renewing = asyncio.Event()
    real_renew = store.renew_leases

    async def slow_renew(*args: Any, **kwargs: Any) -> Any:
        held = await real_renew(*args, **kwargs)
        renewing.set()
        await asyncio.sleep(0.3)  # a busy store: claims go on meanwhile
        return held

    store.renew_leases = slow_renew  # type: ignore[method-assign]
    relay.stall = ("after_data", 0.1)
    await engine.start(lease_seconds=2.0, concurrency=1)
    await asyncio.wait_for(renewing.wait(), 10)
    renewing.clear()
    await asyncio.wait_for(renewing.wait(), 10)  # a renewal has just asked for its leases
    mids = [await engine.put(f"p{i}@example.org") for i in range(5)]
    for mid in mids:
        await engine.wait(mid, "sent", timeout=10)
    assert "lost before sending" not in caplog.text, caplog.text
