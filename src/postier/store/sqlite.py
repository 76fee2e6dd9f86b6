"""The embedded SQLite backend: zero set-up, one file in the data directory.

WAL mode lets the API read while the writer commits; ``synchronous=FULL`` makes each
commit durable on disk before it returns, which is what an acknowledgement promises. The
single writer connection starts its transactions with ``BEGIN IMMEDIATE`` so that two
processes (the server and a CLI command) queue for the lock instead of failing halfway.

The hot paths do not go through aiosqlite: it hands every call (begin, execute, fetch,
commit...) to its thread and back, 10-16 round trips through a busy event loop per
transaction (docs/performance.md). Instead, a whole group of write jobs runs as one call
over a synchronous connection whose ``execute`` never suspends, and each read is one call
on a small pool of reader threads. The asynchronous engines remain for migrations and the
occasional direct use.

Where that call runs depends on the process's role (:data:`Role`):

- ``"all"`` (a server that accepts and delivers on one event loop, the CLI): on a writer
  thread, so that the loop goes on delivering while a commit waits for the disk.
- ``"accept"`` (a server whose delivery is in other processes, or off): on the event loop
  itself. A thread's transaction pays for every statement twice in hand-overs of the GIL
  to a busy loop, and holds SQLite's write lock meanwhile, which a delivery process is
  waiting for; on the loop, a commit blocks only for its own disk write (about 0.2 ms on
  an SSD), which the requests waiting for it would wait for anyway. Waiting for another
  process's lock is an ``asyncio.sleep``, never a blocked loop.
- ``"deliver"`` (a delivery process of ``postier serve``): on the writer thread while it
  has the lock to itself (draining a queue, SQLite's own work then overlaps the loop's),
  on the event loop for a second after finding the server holding it (the server is
  accepting, and waits for the lock in turn). With ``synchronous=NORMAL``: its claims and
  results reach the disk at the next commit of an acceptance (the WAL is one file, synced
  in order) or checkpoint, not each on its own. A power cut may thus lose the last
  results of the moment: those e-mails are sent again, a possible duplicate, never a loss.
  Every acceptance stays ``synchronous=FULL``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Connection, Engine, RootTransaction, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from postier.errors import StoreUnavailable
from postier.store.records import Role
from postier.store.sql import SQLStore
from postier.store.sql_base import WriteJob, _translate

READER_THREADS = 4

# Rows written from which a transaction on the event loop commits on the writer thread
# (about 400 e-mails: each is a message row and a row per recipient).
BIG_TRANSACTION_ROWS = 1000
# Seconds a delivery process keeps its transactions on the event loop after finding
# another process holding the write lock.
CONTENDED_FOR = 1.0


# How long a writer waits for another process's lock before the request fails with a
# clear "try again" (503/451) rather than hanging.
BUSY_TIMEOUT_MS = int(os.environ.get("POSTIER_SQLITE_BUSY_TIMEOUT_MS", "10000"))


def _pragmas(
    immediate: bool, busy_ms: int = BUSY_TIMEOUT_MS, synchronous: str = "FULL"
) -> tuple[Any, Any]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
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


def _try_begin(conn: Connection) -> RootTransaction | None:
    """``BEGIN IMMEDIATE`` at once, or None while another process holds the write lock
    (the writing connections have no busy timeout of their own)."""
    try:
        return conn.begin()
    except OperationalError as exc:
        conn.rollback()
        if "locked" not in str(exc).lower():
            raise
        return None


def _lock_waits() -> Iterator[float]:
    """The pauses between two tries at another process's write lock.

    SQLite's own busy handler sleeps 1, 2, 5, 10... ms between tries: while the server and
    a delivery process (``--delivery-processes``) take turns at the lock for transactions
    of a fraction of a millisecond, most of their time went to those sleeps. Here: 0.1 ms,
    doubling up to 2 ms, until BUSY_TIMEOUT_MS, then a clear "database locked".
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.0001
    while time.monotonic() < deadline:
        yield delay
        delay = min(delay * 2, 0.002)
    raise StoreUnavailable(reason="database locked")


def _begin(conn: Connection, threads: _Threads | None = None) -> RootTransaction:
    """``BEGIN IMMEDIATE`` on the writer thread, waiting for the lock in short steps (and
    telling ``threads`` that another process wanted it)."""
    waits = _lock_waits()
    while (tx := _try_begin(conn)) is None:
        if threads is not None:
            threads.contended()
        time.sleep(next(waits))
    return tx


def _connect_and_begin(engine: Engine) -> tuple[Connection, RootTransaction] | None:
    conn = engine.connect()
    try:
        tx = _try_begin(conn)
    except BaseException:
        conn.close()
        raise
    if tx is None:
        conn.close()
        return None
    return conn, tx


def _commit_and_close(conn: Connection, tx: RootTransaction) -> None:
    try:
        tx.commit()
    finally:
        conn.close()  # rolls back what a failed commit left


def _run_jobs(conn: Connection, jobs: list[WriteJob]) -> list[Any]:
    adapter: Any = _SyncConnection(conn)
    return [_run_to_end(job(adapter)) for job in jobs]  # type: ignore[arg-type]


class _Threads:
    """The writer thread (one transaction at a time) and the reader threads."""

    def __init__(self, write: Engine, read: Engine) -> None:
        self.write = write
        self.read = read
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="postier-sqlite-writer")
        self.readers = ThreadPoolExecutor(READER_THREADS,
                                          thread_name_prefix="postier-sqlite-reader")
        self._contended_until = 0.0

    def contended(self) -> None:
        """Another process held the write lock when this one asked for it."""
        self._contended_until = time.monotonic() + CONTENDED_FOR

    async def by_contention(self, jobs: list[WriteJob]) -> list[Any]:
        """Role "deliver": on the writer thread while this process has the lock to itself
        (draining a queue, SQLite's own work then overlaps the event loop's), on the event
        loop for a while once another process (the server, accepting) was found holding
        it: a thread's transaction keeps the lock while it waits to get the GIL back from a
        busy loop, and the server's acceptances waited for it."""
        if time.monotonic() < self._contended_until:
            return await self.on_loop(jobs)
        return await self.transaction(jobs)

    async def transaction(self, jobs: list[WriteJob]) -> list[Any]:
        return await asyncio.get_running_loop().run_in_executor(
            self.writer, self._transaction, jobs
        )

    def _transaction(self, jobs: list[WriteJob]) -> list[Any]:
        with self.write.connect() as conn, _begin(conn, self):  # commits, or rolls back
            return _run_jobs(conn, jobs)

    async def on_loop(self, jobs: list[WriteJob]) -> list[Any]:
        """The same transaction run on the event loop (roles "accept" and "deliver"): no
        thread hand-over; waiting for another process's lock does not block the loop.

        Only the commit of a big transaction (a batch of hundreds of e-mails: megabytes to
        sync, several milliseconds) goes to the writer thread, so that the loop reads and
        checks the next request meanwhile; one hand-over costs little against that."""
        waits: Iterator[float] | None = None
        while (found := _connect_and_begin(self.write)) is None:
            self.contended()
            waits = waits or _lock_waits()
            await asyncio.sleep(next(waits))
        conn, tx = found
        try:
            sqlite: Any = conn.connection.driver_connection
            before = sqlite.total_changes
            results = _run_jobs(conn, jobs)
            big = sqlite.total_changes - before >= BIG_TRANSACTION_ROWS
        except BaseException:
            conn.close()  # rolls back
            raise
        if big:
            # The thread closes the connection too: even if this task is cancelled
            # meanwhile, nobody touches the connection while it commits.
            await asyncio.get_running_loop().run_in_executor(
                self.writer, _commit_and_close, conn, tx)
        else:
            _commit_and_close(conn, tx)
        return results

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
    embedded = True
    backend = "sqlite"

    def __init__(self, url: str, role: Role = "all") -> None:
        self.role = role
        write = create_async_engine(url, poolclass=NullPool if ":memory:" in url else None)
        # A steady pool: SQLAlchemy's default closes every connection beyond five after use,
        # and each new aiosqlite connection is a thread and four PRAGMAs.
        read = create_async_engine(url, pool_size=20, max_overflow=0)
        # (engine, BEGIN IMMEDIATE?, busy timeout in ms, synchronous)
        engines = [(write.sync_engine, True, BUSY_TIMEOUT_MS, "FULL"),
                   (read.sync_engine, False, BUSY_TIMEOUT_MS, "FULL")]
        sync = _sync_engines(url)
        self._threads = _Threads(*sync) if sync else None
        transaction = None
        if sync and self._threads:
            # The hot writer waits for another process's lock itself (_lock_waits).
            engines += [(sync[0], True, 0, "NORMAL" if role == "deliver" else "FULL"),
                        (sync[1], False, BUSY_TIMEOUT_MS, "FULL")]
            transaction = {"all": self._threads.transaction,
                           "accept": self._threads.on_loop,
                           "deliver": self._threads.by_contention}[role]
        for engine, immediate, busy_ms, synchronous in engines:
            on_connect, on_begin = _pragmas(immediate, busy_ms, synchronous)
            event.listen(engine, "connect", on_connect)
            event.listen(engine, "begin", on_begin)
        super().__init__(write, read, transaction=transaction)

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
