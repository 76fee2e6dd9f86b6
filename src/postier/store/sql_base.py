"""The SQL store's foundation, shared by every part of it: the engines, the group-commit
writer, the translation of database failures, and the helpers of driver-level SQL.

Writes go through a group-commit writer: concurrent acceptances, claims and delivery
results are gathered and committed together, so one fsync acknowledges many messages
(what Postfix's queue manager and every fast database queue do). A caller is answered only
after the commit that holds its rows has returned. If a grouped transaction fails, each
request is retried alone so one bad request cannot fail the others.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import exc as sa_exc
from sqlalchemy import literal
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from postier.core.aio import cancel_and_wait
from postier.errors import Conflict, StoreUnavailable
from postier.i18n import N_
from postier.store.migrate import upgrade

# A write job runs in a transaction with the other jobs of its group. It may carry two
# attributes: ``prepare()``, called on the event loop before it runs, and ``whole_alone``,
# true when each of its statements leaves the store consistent by itself (a backend may
# then run the job alone without BEGIN and COMMIT: PostgreSQL's acceptance, claims and
# delivery results).
WriteJob = Callable[[AsyncConnection], Awaitable[Any]]


class _GroupWriter:
    """Runs write jobs in as few transactions as possible, one transaction at a time."""

    def __init__(
        self,
        engine: AsyncEngine,
        max_jobs: int = 512,
        transaction: Callable[[list[WriteJob]], Awaitable[list[Any]]] | None = None,
    ) -> None:
        self._engine = engine
        self._max_jobs = max_jobs
        # A backend may run a whole transaction elsewhere (SQLite: on its own thread).
        self._run_transaction = transaction or self._transaction
        self._pending: list[tuple[WriteJob, asyncio.Future[Any]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="postier-store-writer")

    async def stop(self) -> None:
        if self._task is not None:
            # Let queued jobs finish before stopping: they were promised an answer.
            if self._pending:
                await asyncio.gather(*(f for _, f in self._pending), return_exceptions=True)
            await cancel_and_wait(self._task)
            self._task = None

    async def run(self, job: WriteJob) -> Any:
        if self._task is None:
            raise RuntimeError("store is not open")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((job, fut))
        self._wakeup.set()
        return await fut

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self._max_jobs]
                del self._pending[: self._max_jobs]
                await self._commit(batch)

    async def _commit(self, batch: list[tuple[WriteJob, asyncio.Future[Any]]]) -> None:
        for job, _ in batch:
            prepare = getattr(job, "prepare", None)
            if prepare is not None:
                prepare()  # on the event loop, before the job may run on another thread
        try:
            results = await self._run_transaction([job for job, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                _, fut = batch[0]
                if not fut.done():
                    fut.set_exception(_translate(exc))
                return
            # Retry one by one so one failing request cannot fail its neighbours.
            for item in batch:
                await self._commit([item])
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)

    async def _transaction(self, jobs: list[WriteJob]) -> list[Any]:
        async with self._engine.begin() as conn:
            return [await job(conn) for job in jobs]


class _MergeGroup:
    """Requests of one kind waiting for the same statement."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.callers = 0
        self.future: asyncio.Future[Any]


# Failures of the way to the database rather than of a statement: it is stopped,
# restarting, unreachable, out of connections, or cut the connection. Trying again later
# may work. Whatever layer raises them: asyncpg raises a refused connection as an OSError,
# SQLAlchemy wraps most of the others in DBAPIError.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # CannotConnectNow, ConnectionDoesNotExist...
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # admin or crash shutdown
    asyncpg.TooManyConnectionsError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # no pooled connection came free in time
)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: the driver's error, its cause, its context."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 8:
        chain.append(current)
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return chain


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached (rather than a wrong statement)."""
    return any(isinstance(e, _UNREACHABLE) for e in _causes(exc))


def database_unreachable() -> StoreUnavailable:
    return StoreUnavailable(
        N_("The database cannot be reached right now; nothing was changed. Try again in a "
           "moment."),
        hint=N_("Postier goes on by itself once the database answers again; if this lasts, "
                "the administrator can check that the database server is running."),
    )


def _translate(exc: Exception) -> Exception:
    """Turn database failures into errors a person can act on (the original is kept as
    the new error's cause, for the log)."""
    translated = _translated(exc)
    if translated is not exc:
        translated.__cause__ = exc
    return translated


def _translated(exc: Exception) -> Exception:
    if isinstance(exc, IntegrityError):
        return Conflict(str(exc.orig) if exc.orig else str(exc))
    if isinstance(exc, OperationalError | DBAPIError):
        text = str(getattr(exc, "orig", None) or exc).lower()
        if "full" in text or "no space" in text:
            err = StoreUnavailable(reason="disk full")
            err.http_status = 507
            return err
        if "locked" in text or "busy" in text:
            return StoreUnavailable(reason="database locked")
    if unreachable(exc):
        return database_unreachable()
    if isinstance(exc, OperationalError | DBAPIError):
        return StoreUnavailable(reason="database error")
    return exc


def _constant(status: str) -> Any:
    """A status written into the SQL text rather than bound as a parameter. The partial
    indexes of the queue (``ix_messages_due``: ``WHERE status IN ('queued', 'deferred')``,
    ``ix_messages_leases``) serve a query only when the planner sees the value itself:
    SQLite never matches ``status IN (?, ?)`` to them and scans the whole table instead,
    so that every claim cost time in proportion to the messages queued
    (``bench/scenarios/queue_scale.py`` measures it); PostgreSQL's generic plans are in
    the same case."""
    return literal(status, literal_execute=True)


@functools.lru_cache(maxsize=512)
def _driver_sql(statement: str, dialect: str) -> str:
    """A statement written with ``?`` for each parameter, in the driver's own style:
    SQLite's ``?`` as it is, PostgreSQL's (asyncpg) ``$1``, ``$2``..."""
    if dialect != "postgresql":
        return statement
    first, *rest = statement.split("?")
    return first + "".join(f"${n}{part}" for n, part in enumerate(rest, 1))


class SQLBase:
    """The one engine pair and the one writer every part of the SQL store works with."""

    def __init__(
        self,
        write_engine: AsyncEngine,
        read_engine: AsyncEngine,
        transaction: Callable[[list[WriteJob]], Awaitable[list[Any]]] | None = None,
    ) -> None:
        self.write_engine = write_engine
        self.read_engine = read_engine
        self._writer = _GroupWriter(write_engine, transaction=transaction)
        self._groups: dict[Hashable, _MergeGroup] = {}

    # -- lifecycle -----------------------------------------------------------------------
    async def open(self) -> None:
        async with self.write_engine.begin() as conn:
            await conn.run_sync(upgrade)
        self._writer.start()

    async def close(self) -> None:
        await self._writer.stop()
        await self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            await self.read_engine.dispose()

    async def write(self, job: WriteJob) -> Any:
        return await self._writer.run(job)

    async def _read(self, stmt: Any) -> list[Any]:
        try:
            async with self.read_engine.connect() as conn:
                return list((await conn.execute(stmt)).all())
        except Exception as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    async def _merged(
        self,
        kind: Hashable,
        items: list[Any],
        handler: Callable[[AsyncConnection, list[Any]], Awaitable[list[Any] | None]],
        *,
        whole_alone: bool = False,
    ) -> Any:
        """Run ``handler`` once for the items of all concurrent callers of the same kind.

        Concurrent acceptances (or delivery results) share one multi-row statement instead
        of three statements each; the group stays open until its job starts.
        ``whole_alone``: each statement of ``handler`` leaves the store consistent by
        itself, so a backend may run it without a transaction of its own (see
        ``WriteJob``).
        """
        group = self._groups.get(kind)
        if group is None:
            group = self._groups[kind] = _MergeGroup()

            def close_group() -> None:
                # From here on, callers of this kind start a new group: the items are final.
                if self._groups.get(kind) is group:
                    del self._groups[kind]

            async def job(conn: AsyncConnection) -> list[Any] | None:
                close_group()
                return await handler(conn, group.items)

            job.prepare = close_group  # type: ignore[attr-defined]
            job.whole_alone = whole_alone  # type: ignore[attr-defined]
            group.future = asyncio.ensure_future(self.write(job))
        start = len(group.items)
        group.items.extend(items)
        group.callers += 1
        try:
            results = await asyncio.shield(group.future)
        except Exception:
            if group.callers == 1:
                raise
            # Somebody else's rows broke the shared statement: ours go again, alone.
            return await self.write(lambda conn: handler(conn, items))
        return None if results is None else results[start : start + len(items)]

    # -- driver-level SQL ----------------------------------------------------------------
    def _sql(self, statement: str) -> str:
        return _driver_sql(statement, self.write_engine.dialect.name)

    def _in(
        self, column: str, values: Sequence[Any], *, negate: bool = False
    ) -> tuple[str, list[Any]]:
        """``column IN (...)`` and its parameters: on PostgreSQL one array parameter, so
        the statement's text (and asyncpg's prepared statement) is the same whatever the
        number of values; on SQLite a placeholder each. Only placeholders and names
        written here go into the text (hence the ``noqa: S608`` where it is used)."""
        if self.write_engine.dialect.name == "postgresql":
            return (f"{column} <> ALL(?)" if negate else f"{column} = ANY(?)"), [list(values)]
        marks = ", ".join("?" * len(values))
        return f"{column} {'NOT IN' if negate else 'IN'} ({marks})", list(values)

    def _dialect(self) -> Any:
        """The backend's SQL dialect module (for ``insert ... on_conflict_do_nothing``)."""
        return postgresql if self.write_engine.dialect.name == "postgresql" else sqlite
