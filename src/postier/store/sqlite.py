"""The embedded SQLite backend: zero set-up, one file in the data directory.

WAL mode lets the API read while the writer commits; ``synchronous=FULL`` makes each
commit durable on disk before it returns, which is what an acknowledgement promises. The
single writer connection starts its transactions with ``BEGIN IMMEDIATE`` so that two
processes (the server and a CLI command) queue for the lock instead of failing halfway.

The hot paths do not go through aiosqlite: it hands every call (begin, execute, fetch,
commit...) to its thread and back, 10-16 round trips through a busy event loop per
transaction (docs/performance.md). Instead, a whole group of write jobs runs as one call
on a dedicated writer thread, over a synchronous connection whose ``execute`` never
suspends, and each read is one call on a small pool of reader threads. The asynchronous
engines remain for migrations and the occasional direct use.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Connection, Engine, RootTransaction, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from postier.store.sql import SQLStore, WriteJob, _translate

READER_THREADS = 4

# How long a writer waits for another process's lock before the request fails with a
# clear "try again" (503/451) rather than hanging.
BUSY_TIMEOUT_MS = int(os.environ.get("POSTIER_SQLITE_BUSY_TIMEOUT_MS", "10000"))


def _pragmas(immediate: bool, busy_ms: int = BUSY_TIMEOUT_MS) -> tuple[Any, Any]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={busy_ms}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    def on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return on_connect, on_begin


class _SyncConnection:
    """Enough of ``AsyncConnection`` for the store's jobs, over a synchronous connection:
    its ``execute`` never suspends, so a job runs to its end in one ``send``."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        return self._conn.execute(statement, parameters)

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> Any:
        return self._conn.exec_driver_sql(statement, parameters)


def _run_to_end(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a store job waited for something other than the database")


def _begin(conn: Connection) -> RootTransaction:
    """``BEGIN IMMEDIATE``, waiting for another process's write lock in short steps.

    SQLite's own busy handler sleeps 1, 2, 5, 10... ms between tries: while the server and
    a delivery process (``--delivery-processes``) take turns at the lock for transactions
    of a fraction of a millisecond, most of their time went to those sleeps. Here the
    writer thread tries again after 0.1 ms, doubling up to 2 ms, until BUSY_TIMEOUT_MS.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.0001
    while True:
        try:
            return conn.begin()
        except OperationalError as exc:
            conn.rollback()
            if "locked" not in str(exc).lower() or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.002)


class _Threads:
    """The writer thread (one transaction at a time) and the reader threads."""

    def __init__(self, write: Engine, read: Engine) -> None:
        self.write = write
        self.read = read
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="postier-sqlite-writer")
        self.readers = ThreadPoolExecutor(READER_THREADS,
                                          thread_name_prefix="postier-sqlite-reader")

    async def transaction(self, jobs: list[WriteJob]) -> list[Any]:
        return await asyncio.get_running_loop().run_in_executor(
            self.writer, self._transaction, jobs
        )

    def _transaction(self, jobs: list[WriteJob]) -> list[Any]:
        with self.write.connect() as conn, _begin(conn):  # commits, or rolls back
            adapter: Any = _SyncConnection(conn)
            return [_run_to_end(job(adapter)) for job in jobs]  # type: ignore[arg-type]

    async def select(self, stmt: Any) -> list[Any]:
        return await asyncio.get_running_loop().run_in_executor(
            self.readers, self._select, stmt
        )

    def _select(self, stmt: Any) -> list[Any]:
        with self.read.connect() as conn:
            return list(conn.execute(stmt).all())

    def close(self) -> None:
        self.writer.shutdown(wait=True)
        self.readers.shutdown(wait=True)
        self.write.dispose()
        self.read.dispose()


def _sync_engines(url: str) -> tuple[Engine, Engine] | None:
    if ":memory:" in url:
        return None  # one connection is one database: keep the single async path
    sync_url = make_url(url).set(drivername="sqlite")
    args = {"check_same_thread": False}  # each connection is used by one thread at a time
    write = create_engine(sync_url, pool_size=1, max_overflow=0, connect_args=args)
    read = create_engine(sync_url, pool_size=READER_THREADS, max_overflow=0,
                         connect_args=args)
    return write, read


class SQLiteStore(SQLStore):
    def __init__(self, url: str) -> None:
        write = create_async_engine(url, poolclass=NullPool if ":memory:" in url else None)
        # A steady pool: SQLAlchemy's default closes every connection beyond five after use,
        # and each new aiosqlite connection is a thread and four PRAGMAs.
        read = create_async_engine(url, pool_size=20, max_overflow=0)
        engines = [(write.sync_engine, True), (read.sync_engine, False)]
        sync = _sync_engines(url)
        self._threads = _Threads(*sync) if sync else None
        busy = {}
        if sync:
            engines += [(sync[0], True), (sync[1], False)]
            busy[id(sync[0])] = 0  # the writer thread waits for the lock itself (_begin)
        for engine, immediate in engines:
            on_connect, on_begin = _pragmas(immediate, busy.get(id(engine), BUSY_TIMEOUT_MS))
            event.listen(engine, "connect", on_connect)
            event.listen(engine, "begin", on_begin)
        super().__init__(
            write, read, transaction=self._threads.transaction if self._threads else None
        )

    async def _read(self, stmt: Any) -> list[Any]:
        if self._threads is None:
            return await super()._read(stmt)
        try:
            return await self._threads.select(stmt)
        except (OperationalError, DBAPIError) as exc:
            raise _translate(exc) from exc

    async def close(self) -> None:
        await super().close()
        if self._threads is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._threads.close)
