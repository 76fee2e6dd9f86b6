"""The embedded SQLite backend: zero set-up, one file in the data directory.

WAL mode lets the API read while the writer commits; ``synchronous=FULL`` makes each
commit durable on disk before it returns, which is what an acknowledgement promises. The
single writer connection starts its transactions with ``BEGIN IMMEDIATE`` so that two
processes (the server and a CLI command) queue for the lock instead of failing halfway.
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from postier.store.sql import SQLStore

# How long a writer waits for another process's lock before the request fails with a
# clear "try again" (503/451) rather than hanging.
BUSY_TIMEOUT_MS = int(os.environ.get("POSTIER_SQLITE_BUSY_TIMEOUT_MS", "10000"))


def _pragmas(immediate: bool) -> tuple[Any, Any]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    def on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return on_connect, on_begin


class SQLiteStore(SQLStore):
    def __init__(self, url: str) -> None:
        write = create_async_engine(url, poolclass=NullPool if ":memory:" in url else None)
        # A steady pool: SQLAlchemy's default closes every connection beyond five after use,
        # and each new aiosqlite connection is a thread and four PRAGMAs.
        read = create_async_engine(url, pool_size=20, max_overflow=0)
        for engine, immediate in ((write, True), (read, False)):
            on_connect, on_begin = _pragmas(immediate)
            event.listen(engine.sync_engine, "connect", on_connect)
            event.listen(engine.sync_engine, "begin", on_begin)
        super().__init__(write, read)
