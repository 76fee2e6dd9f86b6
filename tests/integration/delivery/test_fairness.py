"""One establishment's bulk mailing must not hold back another's urgent e-mail."""

from __future__ import annotations

import asyncio
import time

from postier.core.settings import DeliverySettings, RelaySettings
from postier.delivery.pool import RelayPool
from postier.delivery.slots import PrioritySlots
from postier.delivery.worker import DeliveryWorker
from postier.store import create_store
from postier.store.base import NewMessage

from support.relay import FaultRelay


async def test_priority_slots_serve_the_most_urgent_first() -> None:
    slots = PrioritySlots(1)
    await slots.acquire(1)
    order: list[str] = []

    async def take(name: str, priority: int) -> None:
        await slots.acquire(priority)
        order.append(name)
        slots.release()

    tasks = [asyncio.create_task(take(f"bulk{i}", 1)) for i in range(3)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(take("urgent", 0)))
    await asyncio.sleep(0)
    slots.release()
    await asyncio.gather(*tasks)
    assert order == ["urgent", "bulk0", "bulk1", "bulk2"]


async def test_cancelled_waiter_does_not_lose_a_slot() -> None:
    slots = PrioritySlots(1)
    await slots.acquire()
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    slots.release()
    await asyncio.wait_for(slots.acquire(), 1)  # the slot came back


def _msg(i: int, est: int, priority: int) -> NewMessage:
    return NewMessage(
        id=f"{est}-{priority}-{i:06d}", establishment_id=est, user_id=est, priority=priority,
        envelope_from=f"ecole{est}@ac-lyon.fr", header_from="", message_id=f"<{est}.{i}@t>",
        subject=f"{est}-{i}", data=f"Subject: {est}-{i}\r\n\r\nx\r\n".encode(),
        recipients=[f"p{i}@example.org"],
    )


async def test_bulk_of_one_establishment_does_not_delay_anothers_normal_mail(
    store_url: str, relay: FaultRelay
) -> None:
    relay.stall = ("after_data", 0.01)  # a relay that takes its time
    store = create_store(store_url)
    await store.open()
    settings = DeliverySettings(relay=RelaySettings(host=relay.host, port=relay.port,
                                                    security="none", timeout=5))

    async def settings_for(_est: int) -> DeliverySettings:
        return settings

    worker = DeliveryWorker(store, settings_for, pool=RelayPool(concurrency=4),
                            poll_interval=0.05)
    try:
        await store.enqueue([_msg(i, 1, 1) for i in range(2000)])  # establishment 1: bulk
        await worker.start()
        await relay.wait_for_async(50, timeout=20)
        t0 = time.monotonic()
        (urgent,) = await store.enqueue([_msg(0, 2, 0)])  # establishment 2: normal
        worker.notify()
        while (await store.get_message(urgent.id)).status != "sent":  # type: ignore[union-attr]
            assert time.monotonic() - t0 < 20, "the urgent e-mail never left"
            await asyncio.sleep(0.02)
        delay = time.monotonic() - t0
        bulk_done = len(relay.messages)
    finally:
        await worker.stop(grace=0.5)
        await store.close()
    assert delay < 3.0, f"the urgent e-mail waited {delay:.1f} s behind the bulk mailing"
    assert bulk_done < 2000, "measured while the bulk mailing was still going"
