"""A relay's sending limits hold for all the workers together, on both backends.

Several DeliveryWorkers, each with its own store connection and relay pool (what separate
``postier worker`` processes have), share one queue and one real relay. The hour and day
windows are shortened (``SharedLimits(hour=..., day=...)``) so that a test waits seconds,
not a day; the code path is the one production runs.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from postier.core.reasons import explain_error
from postier.core.settings import DeliverySettings, RelaySettings, RetrySettings
from postier.delivery.limits import SharedLimits, relay_key
from postier.delivery.pool import RelayPool
from postier.delivery.worker import DeliveryWorker
from postier.store import create_store
from postier.store.base import MessageRecord, NewMessage, Store

from support.relay import FaultRelay

RAW = (b"From: Alice <alice@ac-lyon.fr>\r\nTo: parents@example.org\r\n"
       b"Subject: Sortie scolaire\r\nMessage-ID: <lim@test>\r\n\r\nBonjour.\r\n")


class Workers:
    """``n`` workers, each with its own store instance, pool and shared-limits view."""

    def __init__(self, url: str, relay: FaultRelay, **relay_kw: Any) -> None:
        self.url = url
        self.settings = DeliverySettings(
            relay=RelaySettings(host=relay.host, port=relay.port, security="none",
                                timeout=3, **relay_kw),
            retry=RetrySettings(first_delay=1, max_delay=1, max_age=3600),
        )
        self.stores: list[Store] = []
        self.workers: list[DeliveryWorker] = []
        self.failures: list[str] = []
        self._n = 0

    async def settings_for(self, _est: int) -> DeliverySettings:
        return self.settings

    async def _failed(self, mid: str) -> None:
        self.failures.append(mid)

    async def start(self, n: int, *, rate_pause: float = 15.0, in_flight: int = 3,
                    **limits_kw: Any) -> None:
        for i in range(n):
            store = create_store(self.url)
            await store.open()
            self.stores.append(store)
            worker = DeliveryWorker(
                store, self.settings_for, worker_id=f"w{i}", claim_batch=in_flight,
                max_in_flight=in_flight,
                poll_interval=0.05, on_failure=self._failed,
                pool=RelayPool(concurrency=3, down_for=0.2, rate_pause=rate_pause,
                               limits=SharedLimits(store, **limits_kw)),
            )
            await worker.start()
            self.workers.append(worker)

    async def put(self, *recipients: str) -> str:
        self._n += 1
        mid = f"{time.time_ns():020d}{self._n:012d}"
        await self.stores[0].enqueue([NewMessage(
            id=mid, establishment_id=1, user_id=1, priority=0,
            envelope_from="alice@ac-lyon.fr", header_from="Alice <alice@ac-lyon.fr>",
            message_id=f"<lim{self._n}@test>", subject=f"n{self._n}", data=RAW,
            recipients=list(recipients))])
        for w in self.workers:
            w.notify()
        return mid

    async def put_many(self, count: int) -> list[str]:
        """``count`` e-mails of one recipient each, queued together."""
        batch = []
        for _ in range(count):
            self._n += 1
            batch.append(NewMessage(
                id=f"{time.time_ns():020d}{self._n:012d}", establishment_id=1, user_id=1,
                priority=0, envelope_from="alice@ac-lyon.fr",
                header_from="Alice <alice@ac-lyon.fr>", message_id=f"<lim{self._n}@test>",
                subject=f"n{self._n}", data=RAW, recipients=[f"m{self._n}@example.org"]))
        await self.stores[0].enqueue(batch)
        for w in self.workers:
            w.notify()
        return [m.id for m in batch]

    async def wait(self, mid: str, status: str, timeout: float = 15.0) -> MessageRecord:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        rec = None
        while time.monotonic() < deadline:
            rec = await self.stores[0].get_message(mid)
            if rec is not None and rec.status == status:
                return rec
            await asyncio.sleep(0.05)
        raise AssertionError(f"message {mid} is not {status} after {timeout} s: {rec}")

    async def close(self) -> None:
        for w in self.workers:
            await w.stop(grace=5)
        for s in self.stores:
            await s.close()


@pytest.fixture
async def workers(store_url: str, relay: FaultRelay) -> AsyncIterator[Workers]:
    # Created before the workers so that the schema is migrated once.
    first = create_store(store_url)
    await first.open()
    await first.close()
    made: list[Workers] = []

    def make(**relay_kw: Any) -> Workers:
        made.append(Workers(store_url, relay, **relay_kw))
        return made[-1]

    yield make  # type: ignore[misc]
    for w in made:
        await w.close()


def _delivery_times(relay: FaultRelay) -> list[float]:
    return sorted(m.at for m in relay.messages)


async def test_three_workers_keep_the_pace_together(workers: Any, relay: FaultRelay) -> None:
    group: Workers = workers(max_per_minute=120)  # one start every 0.5 s, all together
    await group.start(3)
    ids = [await group.put(f"p{i}@example.org") for i in range(9)]
    for mid in ids:
        rec = await group.wait(mid, "sent", timeout=20)
        assert rec.attempts == 1, rec.history
    times = _delivery_times(relay)
    assert len(times) == 9, "each e-mail reached the relay once"
    # Each worker alone would have sent its three in one second (nine in about one); shared,
    # the nine starts are 0.5 s apart: at least 4 s from first to last.
    assert times[-1] - times[0] >= 3.5, f"the workers together went faster than 120/min: {times}"


async def test_hourly_limit_is_shared_and_waits_without_failing(
    workers: Any, relay: FaultRelay
) -> None:
    group: Workers = workers(max_per_hour=3)
    await group.start(3, hour=2.4)  # "an hour" of 2.4 s
    t0 = time.time()
    ids = [await group.put(f"h{i}@example.org") for i in range(6)]
    for mid in ids:
        rec = await group.wait(mid, "sent", timeout=20)
        assert rec.attempts == 1 and [h.outcome for h in rec.history] == ["sent"], (
            "waiting for the window is not an attempt")
    times = _delivery_times(relay)
    assert len(times) == 6
    early = [t for t in times if t - t0 < 2.0]
    assert len(early) == 3, f"at most 3 e-mails in the first window, all workers together: {times}"
    assert group.failures == []


async def test_recipients_per_day_defers_the_rest_then_resumes(
    workers: Any, relay: FaultRelay
) -> None:
    group: Workers = workers(max_recipients_per_day=4)
    # "A day" of 4.8 s; an e-mail whose turn is further than 0.5 s away is deferred.
    await group.start(2, day=4.8, wait_at_most=0.5)
    first = await group.put("a@example.org", "b@example.org", "c@example.org")
    await group.wait(first, "sent")
    second = await group.put("d@example.org", "e@example.org")
    rec = await group.wait(second, "deferred")
    error = json.loads(rec.last_error or "{}")
    assert error["code"] == "relay_limit", error
    assert rec.attempts == 0, "a reached sending limit is not a failed attempt"
    assert rec.next_attempt_at > time.time(), "deferred to when the day's window reopens"
    en = explain_error(rec.last_error, "en")
    fr = explain_error(rec.last_error, "fr")
    assert en is not None and fr is not None
    assert "4 recipients per day" in en["message"] and "resumes at" in en["message"], en
    assert "4 destinataires par jour" in fr["message"] and "reprend" in fr["message"], fr
    assert len(relay.messages) == 1, "the relay got nothing past the limit"
    rec = await group.wait(second, "sent", timeout=15)
    assert rec.attempts == 1
    assert sorted(relay.messages[-1].rcpt_tos) == ["d@example.org", "e@example.org"]
    assert group.failures == [], "no failure notice for a sending limit"


async def test_a_rate_limit_reply_pauses_every_worker(workers: Any, relay: FaultRelay) -> None:
    group: Workers = workers()  # no limits of its own: the pause is read every 0.2 s
    relay.mail_reply = "421 4.4.2 Message submission rate for this client has exceeded"
    await group.start(3, rate_pause=3.0, refresh=0.2)
    first = await group.put("r0@example.org")  # one worker meets the reply
    rec = await group.wait(first, "deferred")
    assert json.loads(rec.last_error or "{}")["code"] == "rate_limited"
    knocks = relay.connections
    # More e-mails: the other workers, which never talked to the relay, take most of them.
    ids = [first] + [await group.put(f"r{i}@example.org") for i in range(1, 9)]
    await asyncio.sleep(1.5)
    assert relay.connections == knocks, (
        "a worker knocked on a relay another worker was asked to leave alone")
    deferred = [await group.wait(m, "deferred") for m in ids[1:]]
    assert {json.loads(r.last_error or "{}")["code"] for r in deferred} == {"rate_limited"}
    relay.mail_reply = None
    for mid in ids:
        rec = await group.wait(mid, "sent", timeout=20)
        assert rec.attempts == 1, f"a slow-down counted as a failure: {rec.history}"
    assert len(relay.messages) == 9 and group.failures == []


# -- max_connections: a relay's connection slots shared by every worker ---------------------


async def test_connection_slots_are_taken_given_back_and_taken_over_after_the_lease(
    store_url: str,
) -> None:
    store = create_store(store_url)
    await store.open()
    try:
        now = 1_000.0
        assert await store.take_relay_slot("r", 2, "a", now, 120) == 0
        assert await store.take_relay_slot("r", 2, "b", now, 120) == 1
        assert await store.take_relay_slot("r", 2, "c", now, 120) is None, "both slots held"
        assert await store.take_relay_slot("other", 2, "c", now, 120) == 0, (
            "another relay's slots are its own")
        await store.release_relay_slot("r", 0, "a")
        assert await store.take_relay_slot("r", 2, "c", now, 120) == 0, "given back, taken"
        # "b" keeps renewing its slot; "c" died (no renewal).
        assert await store.renew_relay_slots("b", [("r", 1)], now + 100, 120) == {("r", 1)}
        later = now + 121
        assert await store.take_relay_slot("r", 2, "d", later, 120) == 0, (
            "a dead worker's slot is taken over once its lease ran out")
        assert await store.take_relay_slot("r", 2, "e", later, 120) is None, (
            "a renewed slot is not taken over")
        assert await store.renew_relay_slots("c", [("r", 0)], later, 120) == set(), (
            "the dead worker learns its slot is gone")
        await store.release_relay_slot("r", 0, "c")  # too late: not its slot any more
        assert await store.take_relay_slot("r", 2, "e", later, 120) is None
    finally:
        await store.close()


async def test_three_workers_never_open_more_connections_than_allowed(
    workers: Any, relay: FaultRelay
) -> None:
    group: Workers = workers(max_connections=2)
    relay.stall = ("after_data", 0.005)  # deliveries overlap: each worker wants several
    # Alone, each worker would open up to 3 connections: 9 together.
    await group.start(3, in_flight=6)
    ids = await group.put_many(300)
    received = await relay.wait_for_async(300, timeout=60)
    for mid in ids[-5:]:
        await group.wait(mid, "sent")
    assert relay.max_sessions <= 2, (
        f"{relay.max_sessions} connections were open at once; the relay allows 2")
    per_recipient = collections.Counter(r for m in received for r in m.rcpt_tos)
    assert len(per_recipient) == 300 and max(per_recipient.values()) == 1, (
        "every e-mail delivered exactly once")
    for mid in ids:
        rec = await group.stores[0].get_message(mid)
        assert rec is not None and rec.status == "sent" and rec.attempts == 1, (
            f"waiting for a connection is not a failed attempt: {rec}")
    assert group.failures == []


async def test_a_dead_workers_connection_slots_come_back_after_its_lease(
    workers: Any, relay: FaultRelay, store_url: str
) -> None:
    settings = RelaySettings(host=relay.host, port=relay.port, security="none", timeout=3,
                             max_connections=2)
    # The worker that dies: it holds both slots (its connections idle, kept 60 s).
    store = create_store(store_url)
    await store.open()
    doomed = RelayPool(concurrency=2, shared_idle=60,
                       limits=SharedLimits(store, lease_seconds=2.0))
    relay.stall = ("after_data", 0.3)
    taken = time.time()  # its leases (2 s) start about now
    await asyncio.gather(*(doomed.send(settings, "alice@ac-lyon.fr", [f"d{i}@example.org"],
                                       RAW) for i in range(2)))
    relay.stall = None
    assert relay.max_sessions == 2
    # Killed: nothing given back, and the system closes its sockets.
    await store.close()
    relay.down()
    relay.up()
    group: Workers = workers(max_connections=2)
    await group.start(1)
    mid = await group.put("after@example.org")
    await asyncio.sleep(1.0)
    assert len(relay.messages) == 2, "both slots are still the dead worker's"
    rec = await group.wait(mid, "sent", timeout=15)
    assert relay.messages[-1].at - taken >= 2.0, "sent only once the dead worker's lease ran out"
    assert rec.attempts == 1 and [h.outcome for h in rec.history] == ["sent"]


async def test_a_live_workers_heartbeat_keeps_its_connection_slot(
    relay: FaultRelay, store_url: str
) -> None:
    settings = RelaySettings(host=relay.host, port=relay.port, security="none", timeout=3,
                             max_connections=1)
    store = create_store(store_url)
    await store.open()
    pool = RelayPool(concurrency=1, shared_idle=60, limits=SharedLimits(store, lease_seconds=1.0))
    try:
        result = await pool.send(settings, "alice@ac-lyon.fr", ["a@example.org"], RAW)
        assert [r.status for r in result.recipients] == ["sent"]
        for _ in range(8):  # 2.4 s of heartbeats, every 0.3 s: well past the 1 s lease
            await asyncio.sleep(0.3)
            await pool.close_idle()
        assert await store.take_relay_slot(relay_key(settings), 1, "other", time.time(),
                                           60) is None, "the renewed slot was taken over"
        assert relay.sessions == 1
        result = await pool.send(settings, "alice@ac-lyon.fr", ["b@example.org"], RAW)
        assert [r.status for r in result.recipients] == ["sent"]
        assert relay.connections == 1, "the connection holding the slot was reused"
        await pool.close()
        assert await store.take_relay_slot(relay_key(settings), 1, "other", time.time(),
                                           60) == 0, "closing the connection gave its slot back"
    finally:
        await pool.close()
        await store.close()


async def test_no_free_connection_slot_defers_without_an_attempt(
    workers: Any, relay: FaultRelay, store_url: str
) -> None:
    settings = RelaySettings(host=relay.host, port=relay.port, security="none", timeout=3,
                             max_connections=1)
    # Another worker holds the only slot (and keeps renewing it).
    store = create_store(store_url)
    await store.open()
    try:
        assert await store.take_relay_slot(relay_key(settings), 1, "elsewhere", time.time(),
                                           3600) == 0
        group: Workers = workers(max_connections=1)
        await group.start(1, wait_at_most=0.5)
        mid = await group.put("waits@example.org")
        rec = await group.wait(mid, "deferred")
        assert rec.attempts == 0, "no connection slot is not a failed attempt"
        assert rec.next_attempt_at > time.time() + 5, "deferred until a slot may be free"
        en = explain_error(rec.last_error, "en")
        fr = explain_error(rec.last_error, "fr")
        assert en is not None and fr is not None
        assert "1 simultaneous connections" in en["message"], en
        assert "1 connexions simultanées" in fr["message"], fr
        assert relay.connections == 0, "the relay was not contacted"
        assert group.failures == []
        await store.release_relay_slot(relay_key(settings), 0, "elsewhere")
        await group.stores[0].retry_now(mid, time.time())
        group.workers[0].notify()
        await group.wait(mid, "sent")
    finally:
        await store.close()
