"""A hosted installation: many establishments on one Postier, sharing the platform relay.

One establishment's flood, or its dead relay, must hold back no other's e-mail: claims
take each establishment's due e-mails in turn, and the relay's connections go to the
establishments waiting for them in turn; within one establishment, priority still counts.
Real relays, real stores (both backends).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from postier.core.settings import DeliverySettings, RelaySettings
from postier.delivery.pool import RelayPool
from postier.delivery.worker import DeliveryWorker
from postier.store.base import NewMessage, Store

from support.relay import FaultRelay

BULK, NORMAL = 1, 0


def _msg(i: int, est: int, priority: int = NORMAL) -> NewMessage:
    return NewMessage(
        id=f"e{est}-p{priority}-{i:06d}", establishment_id=est, user_id=est,
        priority=priority, envelope_from=f"ecole{est}@ac-lyon.fr", header_from="",
        message_id=f"<{est}.{i}@t>", subject=f"{est}-{i}",
        data=f"Subject: {est}-{i}\r\n\r\nx\r\n".encode(), recipients=[f"p{i}@example.org"],
    )


def _est(received_from: str) -> int:
    return int(received_from.removeprefix("ecole").split("@")[0])


@pytest.fixture
def dead_relay(relay_cert: tuple[str, str]) -> Iterator[FaultRelay]:
    """A relay that accepts connections and never says a word."""
    with FaultRelay(cert=relay_cert) as r:
        r.stall = ("connect", 120.0)
        yield r


def _settings(relay: FaultRelay, timeout: int = 5) -> DeliverySettings:
    return DeliverySettings(relay=RelaySettings(host=relay.host, port=relay.port,
                                                security="none", timeout=timeout))


async def test_one_claim_takes_every_establishments_email_beside_a_flood(
    store: Store,
) -> None:
    await store.enqueue([_msg(i, 1) for i in range(300)])  # the flood, queued first
    others = await store.enqueue([_msg(0, est) for est in range(2, 7)])
    claimed = await store.claim("w1", 64, 60, time.time())
    taken = {c.id for c in claimed}
    missing = [o.id for o in others if o.id not in taken]
    assert not missing, f"the claim took {len(claimed)} of the flood and left {missing}"
    assert len(claimed) == 64, "the flood fills what the others leave of the claim"


async def test_priorities_hold_within_an_establishment(store: Store) -> None:
    await store.enqueue([_msg(i, 1, BULK) for i in range(100)])
    (urgent,) = await store.enqueue([_msg(0, 1, NORMAL)])  # accepted after its bulk
    (other,) = await store.enqueue([_msg(0, 2, BULK)])
    claimed = await store.claim("w1", 2, 60, time.time())
    assert {c.id for c in claimed} == {urgent.id, other.id}, (
        "a claim of two should take establishment 1's normal e-mail before its bulk "
        f"mailing, and establishment 2's e-mail; it took {[c.id for c in claimed]}")


async def test_a_full_claim_takes_the_most_urgent_beside_a_small_establishment(
    store: Store,
) -> None:
    # Establishment 1 has normal e-mails and a bulk mailing, establishment 2 one e-mail:
    # the claim fills up with establishment 1's normal e-mails, none of its bulk.
    await store.enqueue([_msg(i, 1, BULK) for i in range(100)])
    await store.enqueue([_msg(i, 1, NORMAL) for i in range(100)])
    (other,) = await store.enqueue([_msg(0, 2, BULK)])
    claimed = await store.claim("w1", 64, 60, time.time())
    bulk = [c.id for c in claimed if c.establishment_id == 1 and c.priority == BULK]
    assert len(claimed) == 64 and other.id in {c.id for c in claimed} and not bulk, (
        f"a claim of 64 took {len(claimed)} e-mails, {len(bulk)} of establishment 1's "
        "bulk mailing before its normal e-mails, establishment 2's e-mail "
        f"{'' if other.id in {c.id for c in claimed} else 'not '}among them")


async def test_successive_claims_go_round_every_establishment(store: Store) -> None:
    # More establishments than one claim looks at: the next claim goes on from there.
    count = 40
    for est in range(1, count + 1):
        await store.enqueue([_msg(i, est) for i in range(3)])
    seen: list[int] = []
    for _ in range(4):
        seen += [c.establishment_id for c in await store.claim("w1", 10, 60, time.time())]
    assert sorted(seen) == list(range(1, count + 1)), (
        "four claims of ten should take each of the 40 establishments' first e-mail "
        f"before anyone's second; establishments served: {sorted(seen)}")


async def test_a_small_claim_looks_past_establishments_with_nothing_due(
    store: Store,
) -> None:
    # Establishments 1-5 wait for a later retry, 6 is left out of this claim (its relay
    # is busy): a claim of two takes the e-mails of 7 and 8, the first with one due.
    for est in range(1, 9):
        stored = await store.enqueue([_msg(i, est) for i in range(3)])
        if est <= 5:
            for m in stored:
                assert await store.set_status(m.id, "deferred", from_statuses=["queued"],
                                              now=time.time(),
                                              next_attempt_at=time.time() + 600)
    now = time.time()
    claimed = await store.claim("w1", 2, 60, now, skip_establishments={6})
    assert sorted(c.establishment_id for c in claimed) == [7, 8], (
        "a claim of two should take one e-mail of each of establishments 7 and 8; it took "
        f"those of {sorted(c.establishment_id for c in claimed)}")
    claimed = await store.claim("w1", 2, 60, now)
    assert sorted(c.establishment_id for c in claimed) == [6, 7], (
        "the next claim should go on with establishment 6 (no longer left out), then 7; "
        f"it took those of {sorted(c.establishment_id for c in claimed)}")


async def test_a_flood_on_the_shared_relay_lets_the_others_through(
    store: Store, relay: FaultRelay
) -> None:
    relay.stall = ("after_data", 0.02)  # the platform relay takes its time
    shared = _settings(relay)

    async def settings_for(_est: int) -> DeliverySettings:
        return shared

    worker = DeliveryWorker(store, settings_for, pool=RelayPool(concurrency=4),
                            poll_interval=0.05)
    flood = 1500
    try:
        await store.enqueue([_msg(i, 1) for i in range(flood)])
        await worker.start()
        await relay.wait_for_async(50, timeout=30)
        before = len(relay.messages)
        await store.enqueue([_msg(0, est) for est in range(2, 6)])
        worker.notify()
        deadline = time.monotonic() + 120
        while len({_est(m.mail_from) for m in relay.messages} - {1}) < 4:
            assert time.monotonic() < deadline, "the other establishments' e-mails never left"
            await asyncio.sleep(0.02)
        received = [_est(m.mail_from) for m in relay.messages]
    finally:
        await worker.stop(grace=0.5)
    overtaken = [received.index(est) - before for est in range(2, 6)]
    # The relay's four connections were busy with the flood; each of the others takes
    # the next one free, after at most the few flood e-mails already under way.
    assert max(overtaken) < 64, (
        f"the others' e-mails went out behind {overtaken} e-mails of the flood")
    assert received.count(1) < flood, "measured while the flood was still going"


async def test_a_dead_relay_of_one_establishment_holds_back_no_other(
    store: Store, relay: FaultRelay, dead_relay: FaultRelay
) -> None:
    live, dead = _settings(relay), _settings(dead_relay, timeout=30)

    async def settings_for(est: int) -> DeliverySettings:
        return dead if est == 2 else live

    worker = DeliveryWorker(store, settings_for, pool=RelayPool(concurrency=4),
                            poll_interval=0.05)
    try:
        await store.enqueue([_msg(i, 2) for i in range(400)])  # its relay never answers
        await worker.start()
        deadline = time.monotonic() + 30
        while dead_relay.connections < 4:  # the dead relay holds its connections
            assert time.monotonic() < deadline, "the worker never tried the dead relay"
            await asyncio.sleep(0.02)
        others = await store.enqueue([_msg(i, est) for est in (1, 3, 4) for i in range(20)])
        worker.notify()
        await relay.wait_for_async(len(others), timeout=25)
        stuck = await store.counts(2)
    finally:
        await worker.stop(grace=0.5)
    assert sorted(_est(m.mail_from) for m in relay.messages) == [1] * 20 + [3] * 20 + [4] * 20
    assert stuck.get("sent", 0) == 0, "establishment 2's relay never answered"
