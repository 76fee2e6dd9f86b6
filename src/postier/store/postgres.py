"""The PostgreSQL backend: several server and worker processes, on several machines, share
one queue.

Claims take rows with ``FOR UPDATE SKIP LOCKED`` so workers never wait for each other nor
take the same message; an acceptance commits and sends ``NOTIFY postier_queue`` so idle
workers wake at once (polling stays as the fallback); leases are renewed by heartbeats and
expire when a worker dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from postier.store.base import NewMessage
from postier.store.sql import SQLStore

log = logging.getLogger(__name__)
CHANNEL = "postier_queue"


class PostgresStore(SQLStore):
    def __init__(self, url: str) -> None:
        engine = create_async_engine(url, pool_size=5, max_overflow=10, pool_pre_ping=True)
        super().__init__(engine, engine)
        self._listener: Any = None
        self._listen_conn: AsyncConnection | None = None

    # Competing workers skip the rows another one is taking instead of waiting.
    _claim_lock = " FOR UPDATE SKIP LOCKED"

    async def _insert_messages(
        self, conn: AsyncConnection, items: list[NewMessage]
    ) -> list[Any]:
        results = await super()._insert_messages(conn, items)
        # Delivered with the commit: workers on other machines wake as soon as it is durable.
        await conn.execute(text(f"NOTIFY {CHANNEL}"))
        return results

    async def listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever new messages are committed by any process."""
        conn = await self.write_engine.connect()
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None

        def on_notify(*_: Any) -> None:
            callback()

        await driver.add_listener(CHANNEL, on_notify)
        self._listen_conn = conn
        self._listener = on_notify

    async def close(self) -> None:
        if self._listen_conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listen_conn.close(), 5)
            self._listen_conn = None
        await super().close()
