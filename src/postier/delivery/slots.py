"""A semaphore that serves its waiters establishment by establishment, most urgent first.

A relay's connections are its slots (:class:`PrioritySlots`): an establishment's bulk
mailing waiting for a relay shared by several establishments does not hold back
another's e-mail, and within an establishment a normal e-mail overtakes its bulk mailing.
"""

from __future__ import annotations

import asyncio
import collections
import heapq


class PrioritySlots:
    """A semaphore whose waiters are served establishment by establishment in turn
    (round-robin over ``group``), and within one most urgent first (lowest priority
    number), then in arrival order: an establishment's bulk mailing waiting for a relay
    shared by several establishments does not hold back another's e-mail, and within an
    establishment a normal e-mail overtakes its bulk mailing."""

    def __init__(self, size: int) -> None:
        self._free = size
        # Per group, its waiters as a heap; the groups with waiters in the order of their
        # turn (a group goes to the back once served).
        self._waiters: dict[int, list[tuple[int, int, asyncio.Future[None]]]] = {}
        self._turn: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._counter = 0

    async def acquire(self, priority: int = 0, group: int = 0) -> None:
        if self._free > 0 and not self._turn:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._counter += 1
        heapq.heappush(self._waiters.setdefault(group, []), (priority, self._counter, fut))
        self._turn.setdefault(group, None)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # it was handed a slot just as it was cancelled
            else:
                self._forget(group, fut)
            raise

    def _forget(self, group: int, fut: asyncio.Future[None]) -> None:
        heap = [w for w in self._waiters.get(group, []) if w[2] is not fut]
        heapq.heapify(heap)
        if heap:
            self._waiters[group] = heap
        else:
            self._waiters.pop(group, None)
            self._turn.pop(group, None)

    def release(self) -> None:
        while self._turn:
            group = next(iter(self._turn))
            heap = self._waiters[group]
            _, _, fut = heapq.heappop(heap)
            if heap:
                self._turn.move_to_end(group)  # its next waiter after the other groups'
            else:
                del self._waiters[group], self._turn[group]
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next waiter
                return
        self._free += 1

