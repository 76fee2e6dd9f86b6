"""A short-lived cache whose reloads are shared ("single flight").

Settings, establishments and DKIM keys are read on every delivery; they are cached for a
couple of seconds so another process's change still counts quickly. Without sharing, the
moment a value expires every delivery in flight (hundreds) reads it again at once; here
the first caller reloads it and the others wait for that one answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._values: dict[K, tuple[V, float]] = {}
        self._loading: dict[K, asyncio.Future[V]] = {}
        self._generation = 0  # bumped by forget(): a reload begun before it is not kept

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        hit = self._values.get(key)
        if hit is not None and time.monotonic() - hit[1] < self.ttl:
            return hit[0]
        pending = self._loading.get(key)
        if pending is None:
            pending = self._start(key, load)
        # shield: a caller cancelled while waiting does not cancel the others' answer.
        return await asyncio.shield(pending)

    def _start(self, key: K, load: Callable[[], Awaitable[V]]) -> asyncio.Future[V]:
        started, generation = time.monotonic(), self._generation

        async def reload() -> V:
            return await load()

        pending = asyncio.ensure_future(reload())
        self._loading[key] = pending

        def done(fut: asyncio.Future[V]) -> None:
            if self._loading.get(key) is fut:
                del self._loading[key]
            if fut.cancelled():
                return
            if fut.exception() is None and generation == self._generation:
                self._values[key] = (fut.result(), started)

        pending.add_done_callback(done)
        return pending

    def forget(self, key: K | None = None) -> None:
        """Drop one key (or everything): the next reader reloads it."""
        self._generation += 1
        if key is None:
            self._values.clear()
            self._loading.clear()
        else:
            self._values.pop(key, None)
            self._loading.pop(key, None)
