"""The SQL store (SQLAlchemy 2 Core, async), shared by SQLite and PostgreSQL.

Writes go through a group-commit writer: concurrent acceptances, claims and delivery
results are gathered and committed together, so one fsync acknowledges many messages
(what Postfix's queue manager and every fast database queue do). A caller is answered only
after the commit that holds its rows has returned. If a grouped transaction fails, each
request is retried alone so one bad request cannot fail the others.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import delete, func, insert, literal, select, tuple_, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from postier.core.aio import cancel_and_wait
from postier.errors import Conflict, InvalidInput, StoreUnavailable
from postier.i18n import N_
from postier.store import schema as t
from postier.store.base import (
    DEFERRED,
    FAILED,
    FAILURES_KEPT,
    QUEUED,
    SENDING,
    STATUSES,
    WAITER_STALE,
    AttemptRecord,
    AuditEntry,
    Claimed,
    EnqueueResult,
    Establishment,
    MessageRecord,
    NewMessage,
    Outcome,
    PaceAsk,
    PaceGrant,
    ProfileRecord,
    RecipientState,
    RelayGrant,
    RelayHealth,
    RelayLimits,
    RelayPause,
    SenderAddress,
    Store,
    TokenInfo,
    User,
)

log = logging.getLogger(__name__)


@dataclass
class _Waiter:
    """A holder waiting for one of a relay's connection slots for an establishment's
    e-mail, in the ``relay_waiters`` line (see ``Store.take_relay_slot``)."""

    relay_key: str
    holder: str
    establishment_id: int
    now: float
    since: float | None = None  # its place in the line, None when not in it yet
    seen_at: float = 0.0

    async def ahead(self, conn: AsyncConnection, held: collections.Counter[int]) -> int:
        """How many live waiters come before this one: their establishment holds fewer
        slots, or as many and they wait longer. Forgets the lapsed ones."""
        w = t.relay_waiters.c
        rows = (await conn.execute(select(w.holder, w.establishment_id, w.since, w.seen_at)
                                   .where(w.relay_key == self.relay_key))).all()
        if not rows:
            return 0
        if any(r.seen_at < self.now - WAITER_STALE for r in rows):
            await conn.execute(delete(t.relay_waiters).where(
                w.relay_key == self.relay_key, w.seen_at < self.now - WAITER_STALE))
        others = []
        for r in rows:
            if r.holder == self.holder and r.establishment_id == self.establishment_id:
                self.since, self.seen_at = float(r.since), float(r.seen_at)
            elif r.seen_at >= self.now - WAITER_STALE:
                others.append((held[int(r.establishment_id)], float(r.since)))
        mine = (held[self.establishment_id],
                self.since if self.since is not None else self.now)
        return sum(1 for rank in others if rank < mine)

    async def wait(self, conn: AsyncConnection, dialect: Any) -> None:
        """Noted as waiting (keeping its place when it was already)."""
        w = t.relay_waiters.c
        if self.since is not None:
            if self.now - self.seen_at < WAITER_STALE / 3:
                return  # seen lately enough: no write at each ask
            await conn.execute(update(t.relay_waiters).where(
                w.relay_key == self.relay_key, w.holder == self.holder,
                w.establishment_id == self.establishment_id).values(seen_at=self.now))
            return
        await conn.execute(dialect.insert(t.relay_waiters).values(
            relay_key=self.relay_key, holder=self.holder,
            establishment_id=self.establishment_id, since=self.now, seen_at=self.now,
        ).on_conflict_do_update(index_elements=["relay_key", "holder", "establishment_id"],
                                set_={"seen_at": self.now}))

    async def done(self, conn: AsyncConnection) -> None:
        """Served: out of the line (only a write when it was in it)."""
        if self.since is None:
            return
        w = t.relay_waiters.c
        await conn.execute(delete(t.relay_waiters).where(
            w.relay_key == self.relay_key, w.holder == self.holder,
            w.establishment_id == self.establishment_id))


def _keys(keys: Sequence[str]) -> list[str]:
    """Throttling keys as stored: a username given over SMTP can be any length."""
    return [k[:400] for k in keys]


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


def _user(row: Any) -> User:
    return User(
        id=row.id,
        establishment_id=row.establishment_id,
        username=row.username,
        email=row.email,
        display_name=row.display_name,
        role=row.role,
        disabled=bool(row.disabled),
        granted_senders=tuple(json.loads(row.granted_senders or "[]")),
        password_hash=row.password_hash,
    )


def _token(row: Any) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        user_id=row.user_id,
        name=row.name,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


def _profile(row: Any) -> ProfileRecord:
    return ProfileRecord(
        row.id, row.establishment_id, row.label, json.loads(row.data), row.created_at,
        row.updated_at,
    )


def _label_taken(label: str) -> InvalidInput:
    return InvalidInput(
        N_("A profile labelled {label!r} already exists: choose another label."),
        field="label",
        label=label,
    )


def _message(row: Any) -> MessageRecord:
    return MessageRecord(
        id=row.id,
        establishment_id=row.establishment_id,
        user_id=row.user_id,
        status=row.status,
        priority=row.priority,
        envelope_from=row.envelope_from,
        header_from=row.header_from,
        message_id=row.message_id,
        subject=row.subject,
        size=row.size,
        created_at=row.created_at,
        updated_at=row.updated_at,
        next_attempt_at=row.next_attempt_at,
        attempts=row.attempts,
        last_error=row.last_error,
        idempotency_key=row.idempotency_key,
        sender_rule=row.sender_rule,
    )


def _constant(status: str) -> Any:
    """A status written into the SQL text rather than bound as a parameter. The partial
    indexes of the queue (``ix_messages_due``: ``WHERE status IN ('queued', 'deferred')``,
    ``ix_messages_leases``) serve a query only when the planner sees the value itself:
    SQLite never matches ``status IN (?, ?)`` to them and scans the whole table instead,
    so that every claim cost time in proportion to the messages queued (36 ms a claim of
    64 with 100,000 queued against 11 ms with 10,000, ``bench/scenarios/queue_scale.py``);
    PostgreSQL's generic plans are in the same case."""
    return literal(status, literal_execute=True)


@functools.lru_cache(maxsize=512)
def _driver_sql(statement: str, dialect: str) -> str:
    """A statement written with ``?`` for each parameter, in the driver's own style:
    SQLite's ``?`` as it is, PostgreSQL's (asyncpg) ``$1``, ``$2``..."""
    if dialect != "postgresql":
        return statement
    first, *rest = statement.split("?")
    return first + "".join(f"${n}{part}" for n, part in enumerate(rest, 1))


# A claim looks at this many (establishment, priority) classes at least (more when it
# takes more e-mails): the cost of a claim is bounded whatever the number of
# establishments with e-mails waiting; the next claim goes on from where it stopped.
CLAIM_WALK_MIN = 32


@dataclass(frozen=True)
class ClaimAsk:
    """One claim's parameters, as the backends' claim statements take them."""

    worker_id: str
    limit: int
    lease_until: float
    now: float
    skip: tuple[int, ...]  # establishments to leave out of this claim
    cursor: int  # the round starts after this establishment
    walk: int  # at most this many (establishment, priority) classes looked at


def fair_order(due: Sequence[Any], walk: Sequence[int], limit: int) -> list[Any]:
    """Round-robin: every establishment's most urgent due e-mail, then every one's
    second, and so on, establishments in the order of the round (``walk``); ``due`` holds
    each establishment's rows in priority order, then by due time."""
    place = {e: i for i, e in reversed(list(enumerate(walk)))}
    rank: dict[int, int] = {}
    keyed = []
    for r in sorted(due, key=lambda r: (place[r.establishment_id], r.priority,
                                         r.next_attempt_at)):
        n = rank[r.establishment_id] = rank.get(r.establishment_id, 0) + 1
        keyed.append(((n, place[r.establishment_id]), r))
    keyed.sort(key=lambda k: k[0])
    return [r for _, r in keyed[:limit]]


class SQLStore(Store):
    """Common SQL implementation; backends provide the engines and the claim statement."""

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
        from postier.store.migrate import upgrade

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

    # -- establishments, users, tokens ---------------------------------------------------
    async def get_establishment(self, slug_or_id: str | int) -> Establishment | None:
        col = t.establishments.c.id if isinstance(slug_or_id, int) else t.establishments.c.slug
        rows = await self._read(select(t.establishments).where(col == slug_or_id))
        if not rows:
            return None
        r = rows[0]
        return Establishment(r.id, r.slug, r.name, bool(r.hosted), bool(r.disabled))

    async def create_establishment(self, slug: str, name: str, hosted: bool) -> Establishment:
        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                insert(t.establishments).values(
                    slug=slug, name=name, hosted=hosted, disabled=False, created_at=time.time()
                )
            )
            return int(res.inserted_primary_key[0])  # type: ignore[index]

        try:
            est_id = await self.write(job)
        except Conflict as exc:
            raise Conflict(N_("An establishment {slug} already exists."), slug=slug) from exc
        return Establishment(est_id, slug, name, hosted, False)

    async def list_establishments(self) -> list[Establishment]:
        rows = await self._read(select(t.establishments).order_by(t.establishments.c.slug))
        return [Establishment(r.id, r.slug, r.name, bool(r.hosted), bool(r.disabled))
                for r in rows]

    async def update_establishment(self, establishment_id: int, **values: Any) -> None:
        async def job(conn: AsyncConnection) -> None:
            await conn.execute(
                update(t.establishments)
                .where(t.establishments.c.id == establishment_id)
                .values(**values)
            )

        await self.write(job)

    async def find_users(
        self, *, username: str | None = None, email: str | None = None
    ) -> list[User]:
        stmt = select(t.users)
        if username is not None:
            stmt = stmt.where(t.users.c.username == username)
        if email is not None:
            stmt = stmt.where(func.lower(t.users.c.email) == email.lower())
        return [_user(r) for r in await self._read(stmt.order_by(t.users.c.id))]

    async def create_user(
        self,
        *,
        establishment_id: int,
        username: str,
        email: str,
        display_name: str,
        role: str,
        password_hash: str | None,
    ) -> User:
        values = {
            "establishment_id": establishment_id,
            "username": username,
            "email": email,
            "display_name": display_name,
            "role": role,
            "password_hash": password_hash,
            "disabled": False,
            "granted_senders": "[]",
            "created_at": time.time(),
        }

        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(insert(t.users).values(**values))
            return int(res.inserted_primary_key[0])  # type: ignore[index]

        try:
            user_id = await self.write(job)
        except Conflict as exc:
            raise Conflict(
                N_("A user named {username} already exists."), username=username
            ) from exc
        user = await self.get_user(user_id=user_id)
        assert user is not None
        return user

    async def get_user(
        self,
        *,
        user_id: int | None = None,
        establishment_id: int | None = None,
        username: str | None = None,
    ) -> User | None:
        stmt = select(t.users)
        if user_id is not None:
            stmt = stmt.where(t.users.c.id == user_id)
        else:
            stmt = stmt.where(
                t.users.c.establishment_id == establishment_id, t.users.c.username == username
            )
        rows = await self._read(stmt)
        return _user(rows[0]) if rows else None

    async def list_users(self, establishment_id: int) -> list[User]:
        rows = await self._read(
            select(t.users)
            .where(t.users.c.establishment_id == establishment_id)
            .order_by(t.users.c.username)
        )
        return [_user(r) for r in rows]

    async def update_user(self, user_id: int, **values: Any) -> None:
        if "granted_senders" in values:
            values["granted_senders"] = json.dumps(list(values["granted_senders"]))

        async def job(conn: AsyncConnection) -> None:
            await conn.execute(update(t.users).where(t.users.c.id == user_id).values(**values))

        await self.write(job)

    async def create_token(self, user_id: int, name: str, token_hash: str) -> TokenInfo:
        now = time.time()

        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                insert(t.tokens).values(
                    user_id=user_id, name=name, token_hash=token_hash, created_at=now
                )
            )
            return int(res.inserted_primary_key[0])  # type: ignore[index]

        token_id = await self.write(job)
        return TokenInfo(token_id, user_id, name, now, None, None)

    async def user_for_token(self, token_hash: str) -> User | None:
        rows = await self._read(
            select(t.users)
            .join(t.tokens, t.tokens.c.user_id == t.users.c.id)
            .join(t.establishments, t.establishments.c.id == t.users.c.establishment_id)
            .where(
                t.tokens.c.token_hash == token_hash,
                t.tokens.c.revoked_at.is_(None),
                t.users.c.disabled.is_(False),
                t.establishments.c.disabled.is_(False),
            )
        )
        return _user(rows[0]) if rows else None

    async def list_tokens(self, user_id: int) -> list[TokenInfo]:
        rows = await self._read(
            select(t.tokens).where(t.tokens.c.user_id == user_id).order_by(t.tokens.c.id)
        )
        return [_token(r) for r in rows]

    async def revoke_token(self, user_id: int, token_id: int) -> bool:
        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                update(t.tokens)
                .where(
                    t.tokens.c.id == token_id,
                    t.tokens.c.user_id == user_id,
                    t.tokens.c.revoked_at.is_(None),
                )
                .values(revoked_at=time.time())
            )
            return int(res.rowcount)

        return bool(await self.write(job))

    async def revoke_all_tokens(self, user_id: int) -> int:
        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                update(t.tokens)
                .where(t.tokens.c.user_id == user_id, t.tokens.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
            return int(res.rowcount)

        result: int = await self.write(job)
        return result

    # -- profiles and audit ----------------------------------------------------------------
    async def create_profile(
        self, establishment_id: int, label: str, data: dict[str, Any]
    ) -> ProfileRecord:
        now = time.time()
        doc = json.dumps(data, sort_keys=True)

        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                insert(t.profiles).values(
                    establishment_id=establishment_id, label=label, data=doc,
                    created_at=now, updated_at=now,
                )
            )
            return int(res.inserted_primary_key[0])  # type: ignore[index]

        try:
            profile_id = await self.write(job)
        except Conflict as exc:
            raise _label_taken(label) from exc
        return ProfileRecord(profile_id, establishment_id, label, data, now, now)

    async def update_profile(self, profile_id: int, label: str, data: dict[str, Any]) -> None:
        doc = json.dumps(data, sort_keys=True)

        async def job(conn: AsyncConnection) -> None:
            await conn.execute(
                update(t.profiles)
                .where(t.profiles.c.id == profile_id)
                .values(label=label, data=doc, updated_at=time.time())
            )

        try:
            await self.write(job)
        except Conflict as exc:
            raise _label_taken(label) from exc

    async def delete_profile(self, profile_id: int) -> bool:
        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(delete(t.profiles).where(t.profiles.c.id == profile_id))
            return int(res.rowcount)

        return bool(await self.write(job))

    async def get_profile(self, profile_id: int) -> ProfileRecord | None:
        rows = await self._read(select(t.profiles).where(t.profiles.c.id == profile_id))
        return _profile(rows[0]) if rows else None

    async def list_profiles(self, establishment_id: int) -> list[ProfileRecord]:
        rows = await self._read(
            select(t.profiles)
            .where(t.profiles.c.establishment_id == establishment_id)
            .order_by(t.profiles.c.label)
        )
        return [_profile(r) for r in rows]

    async def record_retrieval(self, profile_id: int, user_id: int) -> None:
        async def job(conn: AsyncConnection) -> None:
            await conn.execute(
                insert(t.profile_retrievals).values(
                    profile_id=profile_id, user_id=user_id, at=time.time()
                )
            )

        await self.write(job)

    async def audit(
        self,
        establishment_id: int,
        actor: str,
        action: str,
        target: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        row = {
            "establishment_id": establishment_id,
            "at": time.time(),
            "actor": actor,
            "action": action,
            "target": target,
            "details": json.dumps(details or {}, sort_keys=True),
        }

        async def job(conn: AsyncConnection) -> None:
            await conn.execute(insert(t.audit_log).values(**row))

        await self.write(job)

    async def list_audit(self, establishment_id: int, limit: int = 200) -> list[AuditEntry]:
        rows = await self._read(
            select(t.audit_log)
            .where(t.audit_log.c.establishment_id == establishment_id)
            .order_by(t.audit_log.c.id.desc())
            .limit(limit)
        )
        return [
            AuditEntry(r.id, r.at, r.actor, r.action, r.target, json.loads(r.details))
            for r in rows
        ]

    async def get_meta(self, key: str) -> str | None:
        rows = await self._read(select(t.meta.c.value).where(t.meta.c.key == key))
        return str(rows[0].value) if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        async def job(conn: AsyncConnection) -> None:
            res = await conn.execute(update(t.meta).where(t.meta.c.key == key).values(value=value))
            if res.rowcount == 0:
                await conn.execute(insert(t.meta).values(key=key, value=value))

        await self.write(job)

    async def swap_meta(self, key: str, expected: str, value: str) -> bool:
        async def job(conn: AsyncConnection) -> bool:
            res = await conn.execute(update(t.meta).where(
                t.meta.c.key == key, t.meta.c.value == expected).values(value=value))
            return bool(res.rowcount == 1)

        return bool(await self.write(job))

    async def save_dkim_key(
        self, establishment_id: int, domain: str, selector: str, private_enc: str,
        public_b64: str,
    ) -> None:
        async def job(conn: AsyncConnection) -> None:
            await conn.execute(delete(t.dkim_keys).where(
                t.dkim_keys.c.establishment_id == establishment_id,
                t.dkim_keys.c.domain == domain))
            await conn.execute(insert(t.dkim_keys).values(
                establishment_id=establishment_id, domain=domain, selector=selector,
                private_key_enc=private_enc, public_key=public_b64, created_at=time.time()))

        await self.write(job)

    async def list_dkim_keys(self, establishment_id: int) -> list[dict[str, Any]]:
        rows = await self._read(select(t.dkim_keys).where(
            t.dkim_keys.c.establishment_id == establishment_id).order_by(t.dkim_keys.c.domain))
        return [dict(r._mapping) for r in rows]

    async def delete_dkim_key(self, establishment_id: int, domain: str) -> bool:
        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(delete(t.dkim_keys).where(
                t.dkim_keys.c.establishment_id == establishment_id,
                t.dkim_keys.c.domain == domain))
            return int(res.rowcount)

        return bool(await self.write(job))

    # -- domains of a hosted installation ---------------------------------------------------
    async def all_settings(self) -> dict[int, dict[str, Any]]:
        rows = await self._read(select(t.settings.c.establishment_id, t.settings.c.data))
        return {int(r.establishment_id): json.loads(r.data) for r in rows}

    async def all_dkim_domains(self) -> list[tuple[int, str]]:
        rows = await self._read(select(t.dkim_keys.c.establishment_id, t.dkim_keys.c.domain))
        return [(int(r.establishment_id), str(r.domain)) for r in rows]

    async def move_dkim_key(self, from_id: int, to_id: int, domain: str) -> bool:
        keys = t.dkim_keys.c

        async def job(conn: AsyncConnection) -> bool:
            held = await conn.execute(select(keys.establishment_id).where(
                keys.domain == domain, keys.establishment_id.in_((from_id, to_id))))
            owners = {int(r.establishment_id) for r in held}
            if from_id not in owners:
                return False
            mine = (keys.establishment_id == from_id) & (keys.domain == domain)
            if to_id in owners:  # the receiving establishment's own key stays
                await conn.execute(delete(t.dkim_keys).where(mine))
            else:
                await conn.execute(update(t.dkim_keys).where(mine).values(
                    establishment_id=to_id))
            return True

        return bool(await self.write(job))

    # -- settings ------------------------------------------------------------------------
    async def load_settings(self, establishment_id: int) -> tuple[dict[str, Any], float] | None:
        rows = await self._read(
            select(t.settings.c.data, t.settings.c.updated_at).where(
                t.settings.c.establishment_id == establishment_id
            )
        )
        if not rows:
            return None
        return json.loads(rows[0].data), rows[0].updated_at

    async def save_settings(self, establishment_id: int, data: dict[str, Any]) -> None:
        doc = json.dumps(data, sort_keys=True)

        async def job(conn: AsyncConnection) -> None:
            now = time.time()
            res = await conn.execute(
                update(t.settings)
                .where(t.settings.c.establishment_id == establishment_id)
                .values(data=doc, updated_at=now)
            )
            if res.rowcount == 0:
                await conn.execute(
                    insert(t.settings).values(
                        establishment_id=establishment_id, data=doc, updated_at=now
                    )
                )

        await self.write(job)

    # -- queue: acceptance ---------------------------------------------------------------
    async def enqueue(self, batch: Sequence[NewMessage]) -> list[EnqueueResult]:
        if not batch:
            return []
        result: list[EnqueueResult] = await self._merged(
            "enqueue", list(batch), self._insert_messages,
            whole_alone=self._insert_whole_alone,
        )
        return result

    # True where _insert_rows is one statement (PostgreSQL): see WriteJob. The idempotency
    # look-up before it is whole by itself too (a key inserted meanwhile by another
    # process fails the insert, and the e-mails go again, in a transaction).
    _insert_whole_alone = False

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

    async def _insert_messages(
        self, conn: AsyncConnection, items: list[NewMessage]
    ) -> list[EnqueueResult]:
        # Idempotency: a key already stored for this user returns the first message.
        existing: dict[tuple[int, str], tuple[str, str]] = {}
        keyed = [(m.user_id, m.idempotency_key) for m in items if m.idempotency_key]
        if keyed:
            users = {u for u, _ in keyed}
            keys = {k for _, k in keyed}
            rows = await conn.execute(
                select(
                    t.messages.c.user_id,
                    t.messages.c.idempotency_key,
                    t.messages.c.id,
                    t.messages.c.status,
                ).where(
                    t.messages.c.user_id.in_(users), t.messages.c.idempotency_key.in_(keys)
                )
            )
            for r in rows:
                existing[(r.user_id, r.idempotency_key)] = (r.id, r.status)

        now = time.time()
        results: list[EnqueueResult] = []
        msg_rows: list[tuple[Any, ...]] = []
        body_rows: list[tuple[Any, ...]] = []
        rcpt_rows: list[tuple[Any, ...]] = []
        for m in items:
            if m.idempotency_key:
                key = (m.user_id, m.idempotency_key)
                if key in existing:
                    first_id, status = existing[key]
                    results.append(EnqueueResult(first_id, status, True))
                    continue
                existing[key] = (m.id, QUEUED)
            results.append(EnqueueResult(m.id, QUEUED, False))
            msg_rows.append((
                m.id, m.establishment_id, m.user_id, m.priority, m.envelope_from,
                m.header_from, m.message_id, m.subject, len(m.data), m.smtputf8,
                m.idempotency_key, m.sender_rule, now, now, now,
            ))
            body_rows.append((m.id, m.data))
            rcpt_rows.extend((m.id, i, a) for i, a in enumerate(m.recipients))
        if msg_rows:
            await self._insert_rows(conn, now, msg_rows, body_rows, rcpt_rows)
        return results

    async def _insert_rows(
        self,
        conn: AsyncConnection,
        now: float,
        msg_rows: list[tuple[Any, ...]],
        body_rows: list[tuple[Any, ...]],
        rcpt_rows: list[tuple[Any, ...]],
    ) -> None:
        """Store new e-mails: one row of ``msg_rows`` each (id, establishment, user,
        priority, envelope sender, From, Message-ID, subject, size, SMTPUTF8, idempotency
        key, sender rule, then ``now`` three times: created, updated, due), with their
        bodies (id, bytes) and recipients (id, position, address)."""
        # Written for the driver, like the delivery path's statements below: built
        # once, bound as tuples (1,000 e-mails: about 36 -> 26 µs of CPU an e-mail).
        await conn.exec_driver_sql(self._sql(
            "INSERT INTO messages (id, establishment_id, user_id, status, priority,"
            " envelope_from, header_from, message_id, subject, size, smtputf8,"
            " idempotency_key, sender_rule, created_at, updated_at, next_attempt_at,"
            " attempts) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"
        ), msg_rows)
        await conn.exec_driver_sql(self._sql(
            "INSERT INTO message_bodies (message_id, data) VALUES (?, ?)"), body_rows)
        await conn.exec_driver_sql(self._sql(
            "INSERT INTO recipients (message_id, position, address, status)"
            " VALUES (?, ?, ?, 'pending')"), rcpt_rows)

    # -- queue: delivery -----------------------------------------------------------------
    # The delivery path's statements (claim, results, lease renewal) run for every e-mail
    # delivered: they are written for the driver itself (``exec_driver_sql``) rather than
    # built as Core statements at each call, then looked up in the compiled cache and bound
    # row by row through SQLAlchemy's parameter processing. The results of a group of 29
    # e-mails cost 7 µs an e-mail that way against 31 (SQLite); a drain of the bench
    # ``delivery`` about 60 µs less CPU per e-mail in all.
    # ``?`` stands for each parameter (see _driver_sql); the statuses are written into the
    # text, which the queue's partial indexes need (see _constant).

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

    async def claim(
        self, worker_id: str, limit: int, lease_seconds: float, now: float,
        skip_establishments: Collection[int] = (),
    ) -> list[Claimed]:
        ask = ClaimAsk(worker_id, limit, now + lease_seconds, now,
                       tuple(sorted(skip_establishments)), self._claim_cursor,
                       max(CLAIM_WALK_MIN, limit))

        async def job(conn: AsyncConnection) -> list[Claimed]:
            rows, bodies, rcpts, cursor = await self._claim_rows(conn, ask)
            self._claim_cursor = cursor
            if not rows:
                return []
            rows = sorted(rows, key=lambda r: (r.priority, r.next_attempt_at))
            claimed = []
            for r in rows:
                data = bodies.get(r.id)
                if data is None:
                    # A message without its body cannot be sent; fail it loudly rather than
                    # let it block the queue.
                    await conn.execute(
                        update(t.messages)
                        .where(t.messages.c.id == r.id)
                        .values(
                            status="failed",
                            last_error="message body missing from the store",
                            lease_owner=None,
                            lease_expires_at=None,
                        )
                    )
                    continue
                claimed.append(
                    Claimed(
                        id=r.id,
                        establishment_id=r.establishment_id,
                        user_id=r.user_id,
                        envelope_from=r.envelope_from,
                        data=bytes(data),
                        smtputf8=bool(r.smtputf8),
                        attempts=r.attempts,
                        created_at=r.created_at,
                        recipients=rcpts[r.id],
                        priority=r.priority,
                    )
                )
            return claimed

        job.whole_alone = self._claim_whole_alone  # type: ignore[attr-defined]
        result: list[Claimed] = await self.write(job)
        return result

    # True where _claim_rows is one statement (PostgreSQL): see WriteJob.
    _claim_whole_alone = False
    # Where the next claim's round of the establishments starts (this process's own: each
    # process goes round, and together they go round too).
    _claim_cursor = -1

    # The walk's probes, each an exact index range (SQLite does not seek an index on a
    # row-value comparison such as ``(establishment_id, priority) > (?, ?)``, it filters).
    _WALK_FIRST = ("SELECT establishment_id, priority FROM messages"
                   " WHERE status IN ('queued', 'deferred') AND {lap}"
                   " ORDER BY establishment_id, priority LIMIT 1")
    _WALK_SAME = ("SELECT establishment_id, priority FROM messages"
                  " WHERE status IN ('queued', 'deferred') AND establishment_id = ?"
                  " AND priority > ? ORDER BY priority LIMIT 1")
    _WALK_NEXT = ("SELECT establishment_id, priority FROM messages"
                  " WHERE status IN ('queued', 'deferred') AND {lap}"
                  " AND establishment_id > ? ORDER BY establishment_id, priority LIMIT 1")
    _DUE = ("SELECT id, establishment_id, priority, next_attempt_at FROM messages"
            " WHERE status IN ('queued', 'deferred') AND establishment_id = ?"
            " AND priority = ? AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?")

    async def _claim_walk(
        self, conn: AsyncConnection, ask: ClaimAsk, due: list[Any]
    ) -> list[tuple[int, int]]:
        """The (establishment, priority) classes that have e-mails waiting, in the round's
        order: after the cursor, then from the start up to it; at most ``ask.walk``. One
        index probe each, however many e-mails a class holds. Each class's due e-mails
        are added to ``due`` as it is found; the walk stops early once ``ask.limit``
        establishments have one due (the round's first turn alone fills the claim, so
        walking further would change nothing): a small claim among many establishments
        costs a few probes, not ``ask.walk``."""
        walk: list[tuple[int, int]] = []
        skip = set(ask.skip)
        serving: set[int] = set()
        for lap in ("establishment_id > ?", "establishment_id <= ?"):
            last: tuple[int, int] | None = None
            while len(walk) < ask.walk and len(serving) < ask.limit:
                row = None
                if last is None:
                    row = (await conn.exec_driver_sql(self._sql(
                        self._WALK_FIRST.format(lap=lap)), (ask.cursor,))).first()
                else:
                    row = (await conn.exec_driver_sql(
                        self._sql(self._WALK_SAME), last)).first()
                    if row is None:
                        row = (await conn.exec_driver_sql(self._sql(
                            self._WALK_NEXT.format(lap=lap)), (ask.cursor, last[0]))).first()
                if row is None:
                    break
                last = (int(row.establishment_id), int(row.priority))
                walk.append(last)
                if last[0] in skip:
                    continue
                rows = list(await conn.exec_driver_sql(
                    self._sql(self._DUE), (*last, ask.now, ask.limit)))
                if rows:
                    due.extend(rows)
                    serving.add(last[0])
        return walk

    async def _claim_rows(
        self, conn: AsyncConnection, ask: ClaimAsk
    ) -> tuple[list[Any], dict[str, bytes], dict[str, list[RecipientState]], int]:
        """Claim, then read what delivery needs of the claimed e-mails: the claimed rows,
        their bodies and their recipients in order, by id, and the next claim's cursor.

        Each establishment's due e-mails in turn (round-robin), most urgent first within
        one: a flood of one establishment holds back no other's e-mail."""
        due: list[Any] = []
        walk = await self._claim_walk(conn, ask, due)
        cursor = walk[-1][0] if len(walk) >= ask.walk else ask.cursor
        picked = fair_order(due, [e for e, _ in walk], ask.limit)
        if not picked:
            return [], {}, {}, cursor
        if len(picked) >= ask.limit:
            cursor = picked[-1].establishment_id
        cond, params = self._in("id", [r.id for r in picked])
        rows = list((await conn.exec_driver_sql(self._sql(
            "UPDATE messages SET status = 'sending', lease_owner = ?, lease_expires_at = ?,"  # noqa: S608
            f" updated_at = ? WHERE {cond} RETURNING id, establishment_id, user_id,"
            " envelope_from, smtputf8, attempts, created_at, priority, next_attempt_at"),
            (ask.worker_id, ask.lease_until, ask.now, *params))).all())
        bodies, rcpts = await self._claimed_parts(conn, [r.id for r in rows])
        return rows, bodies, rcpts, cursor

    async def _claimed_parts(
        self, conn: AsyncConnection, ids: list[str]
    ) -> tuple[dict[str, bytes], dict[str, list[RecipientState]]]:
        """The bodies and the recipients (in order) of the claimed e-mails ``ids``."""
        if not ids:
            return {}, {}
        cond, params = self._in("message_id", ids)
        bodies = {
            r.message_id: r.data
            for r in await conn.exec_driver_sql(
                self._sql("SELECT message_id, data FROM message_bodies"  # noqa: S608
                          f" WHERE {cond}"),
                tuple(params),
            )
        }
        rcpts: dict[str, list[RecipientState]] = {i: [] for i in ids}
        for r in await conn.exec_driver_sql(
            self._sql("SELECT message_id, position, address, status, code, reply"  # noqa: S608
                      f" FROM recipients WHERE {cond}"
                      " ORDER BY message_id, position"),
            tuple(params),
        ):
            rcpts[r.message_id].append(
                RecipientState(r.position, r.address, r.status, r.code, r.reply)
            )
        return bodies, rcpts

    async def renew_leases(
        self, worker_id: str, ids: Sequence[str], lease_seconds: float, now: float
    ) -> set[str]:
        if not ids:
            return set()
        cond, params = self._in("id", list(ids))
        statement = self._sql(
            "UPDATE messages SET lease_expires_at = ? WHERE lease_owner = ?"  # noqa: S608
            f" AND {cond} RETURNING id"
        )

        async def job(conn: AsyncConnection) -> set[str]:
            rows = await conn.exec_driver_sql(
                statement, (now + lease_seconds, worker_id, *params))
            return {r.id for r in rows}

        held: set[str] = await self.write(job)
        return held

    async def release_expired_leases(self, now: float, *, everything: bool = False) -> int:
        expired = t.messages.c.status == _constant(SENDING)
        if not everything:
            expired = expired & (t.messages.c.lease_expires_at < now)
        return await self._give_back(expired, now)

    async def release_worker(self, worker_id: str) -> int:
        return await self._give_back(
            (t.messages.c.status == _constant(SENDING)) & (t.messages.c.lease_owner == worker_id),
            time.time(),
        )

    async def _give_back(self, which: Any, now: float) -> int:
        """The e-mails ``which`` selects back to the queue, due at ``now``."""
        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                update(t.messages)
                .where(which)
                .values(
                    status=DEFERRED,
                    lease_owner=None,
                    lease_expires_at=None,
                    next_attempt_at=now,
                    updated_at=now,
                )
            )
            return int(res.rowcount)

        result: int = await self.write(job)
        return result

    async def record_outcomes(self, worker_id: str, outcomes: Sequence[Outcome]) -> None:
        if not outcomes:
            return

        async def write_outcomes(conn: AsyncConnection, items: list[Outcome]) -> None:
            await self._write_outcomes(conn, worker_id, items)

        await self._merged(("outcomes", worker_id), list(outcomes), write_outcomes,
                           whole_alone=self._outcomes_whole_alone)

    # True where _write_outcomes is one statement (PostgreSQL): see WriteJob.
    _outcomes_whole_alone = False

    async def _write_outcomes(
        self, conn: AsyncConnection, worker_id: str, items: list[Outcome]
    ) -> None:
        """Every result of the group in three statements, each run over all its rows."""
        now = time.time()
        rcpt_rows = [
            (r.status, r.code, r.reply, now, o.message_id, r.position)
            for o in items
            for r in o.recipients
        ]
        if rcpt_rows:
            await conn.exec_driver_sql(self._sql(
                "UPDATE recipients SET status = ?, code = ?, reply = ?, updated_at = ?"
                " WHERE message_id = ? AND position = ?"
            ), rcpt_rows)
        await conn.exec_driver_sql(self._sql(
            "INSERT INTO attempts (message_id, started_at, duration_ms, relay, outcome, code,"
            " detail, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        ), [
            (o.message_id, o.attempt.started_at, o.attempt.duration_ms, o.attempt.relay,
             o.attempt.outcome, o.attempt.code, o.attempt.detail, o.attempt.reason)
            for o in items
        ])
        # Only the lease holder decides the message's status: if the lease was lost
        # (and the message taken by another worker), the recipients' results above
        # are still true, but the status belongs to the new holder.
        await conn.exec_driver_sql(self._sql(
            "UPDATE messages SET status = ?, attempts = ?, next_attempt_at = ?, last_error = ?,"
            " lease_owner = NULL, lease_expires_at = NULL, updated_at = ?"
            " WHERE id = ? AND lease_owner = ?"
        ), [
            (o.status, o.attempts, o.next_attempt_at, o.last_error, now, o.message_id,
             worker_id)
            for o in items
        ])

    # -- queue: reading and administration -----------------------------------------------
    async def get_message(self, message_id: str) -> MessageRecord | None:
        rows = await self._read(select(t.messages).where(t.messages.c.id == message_id))
        if not rows:
            return None
        record = _message(rows[0])
        record.recipients = [
            RecipientState(r.position, r.address, r.status, r.code, r.reply)
            for r in await self._read(
                select(t.recipients)
                .where(t.recipients.c.message_id == message_id)
                .order_by(t.recipients.c.position)
            )
        ]
        record.history = [
            AttemptRecord(r.started_at, r.duration_ms, r.relay, r.outcome, r.code, r.detail,
                          r.reason)
            for r in await self._read(
                select(t.attempts)
                .where(t.attempts.c.message_id == message_id)
                .order_by(t.attempts.c.id)
            )
        ]
        return record

    async def list_messages(
        self,
        *,
        establishment_id: int,
        user_id: int | None = None,
        status: str | None = None,
        limit: int = 100,
    ) -> list[MessageRecord]:
        stmt = select(t.messages).where(t.messages.c.establishment_id == establishment_id)
        if user_id is not None:
            stmt = stmt.where(t.messages.c.user_id == user_id)
        if status is not None:
            stmt = stmt.where(t.messages.c.status == status)
        stmt = stmt.order_by(t.messages.c.created_at.desc(), t.messages.c.id.desc()).limit(limit)
        records = [_message(r) for r in await self._read(stmt)]
        if records:
            by_id = {r.id: r for r in records}
            for r in await self._read(
                select(t.recipients)
                .where(t.recipients.c.message_id.in_(list(by_id)))
                .order_by(t.recipients.c.message_id, t.recipients.c.position)
            ):
                by_id[r.message_id].recipients.append(
                    RecipientState(r.position, r.address, r.status, r.code, r.reply)
                )
        return records

    async def set_status(
        self,
        message_id: str,
        status: str,
        *,
        from_statuses: Sequence[str],
        now: float,
        next_attempt_at: float | None = None,
    ) -> bool:
        values: dict[str, Any] = {"status": status, "updated_at": now}
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at

        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                update(t.messages)
                .where(t.messages.c.id == message_id, t.messages.c.status.in_(from_statuses))
                .values(**values)
            )
            return int(res.rowcount)

        return bool(await self.write(job))

    async def has_body(self, message_id: str) -> bool:
        rows = await self._read(
            select(t.bodies.c.message_id).where(t.bodies.c.message_id == message_id)
        )
        return bool(rows)

    async def retry_now(self, message_id: str, now: float) -> bool:
        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(
                update(t.messages)
                .where(
                    t.messages.c.id == message_id,
                    t.messages.c.status.in_((QUEUED, DEFERRED, FAILED)),
                )
                .values(status=QUEUED, next_attempt_at=now, updated_at=now)
            )
            if res.rowcount:
                await conn.execute(
                    update(t.recipients)
                    .where(
                        t.recipients.c.message_id == message_id,
                        t.recipients.c.status == FAILED,
                    )
                    .values(status="pending", updated_at=now)
                )
            return int(res.rowcount)

        return bool(await self.write(job))

    async def retry_matching(
        self, *, establishment_id: int, user_id: int | None, statuses: Sequence[str],
        now: float, sender: str | None = None, recipient: str | None = None,
        since: float | None = None, until: float | None = None,
    ) -> int:
        m, r = t.messages, t.recipients
        chosen = [m.c.establishment_id == establishment_id,
                  m.c.status.in_([s for s in statuses if s in (QUEUED, DEFERRED, FAILED)]),
                  select(t.bodies.c.message_id).where(t.bodies.c.message_id == m.c.id)
                  .exists()]
        if user_id is not None:
            chosen.append(m.c.user_id == user_id)
        if sender:
            chosen.append(m.c.header_from.icontains(sender, autoescape=True)
                          | m.c.envelope_from.icontains(sender, autoescape=True))
        if recipient:
            chosen.append(select(r.c.message_id).where(
                r.c.message_id == m.c.id,
                r.c.address.icontains(recipient, autoescape=True)).exists())
        if since is not None:
            chosen.append(m.c.created_at >= since)
        if until is not None:
            chosen.append(m.c.created_at < until)

        async def job(conn: AsyncConnection) -> int:
            # Recipients first, while the messages still have their old status; a message
            # in "sending" is left to its worker.
            await conn.execute(
                update(t.recipients)
                .where(t.recipients.c.status == FAILED,
                       t.recipients.c.message_id.in_(select(m.c.id).where(*chosen)))
                .values(status="pending", updated_at=now)
            )
            res = await conn.execute(
                update(m).where(*chosen).values(status=QUEUED, next_attempt_at=now,
                                                updated_at=now))
            return int(res.rowcount)

        return int(await self.write(job))

    async def get_content(self, message_id: str) -> tuple[bytes, bool] | None:
        rows = await self._read(
            select(t.bodies.c.data, t.messages.c.smtputf8)
            .join(t.messages, t.messages.c.id == t.bodies.c.message_id)
            .where(t.bodies.c.message_id == message_id))
        return (bytes(rows[0].data), bool(rows[0].smtputf8)) if rows else None

    async def counts(self, establishment_id: int | None = None) -> dict[str, int]:
        stmt = select(t.messages.c.status, func.count()).group_by(t.messages.c.status)
        if establishment_id is not None:
            stmt = stmt.where(t.messages.c.establishment_id == establishment_id)
        out = dict.fromkeys(STATUSES, 0)
        for status, n in await self._read(stmt):
            out[status] = int(n)
        return out

    # -- sender address verification -----------------------------------------------------
    async def list_sender_addresses(self, user_id: int) -> list[SenderAddress]:
        sa = t.sender_addresses
        rows = await self._read(
            select(sa).where(sa.c.user_id == user_id).order_by(sa.c.address_key))
        return [SenderAddress(r.address, r.verified_at,
                              r.code_expires_at if r.code_hash else None, r.failed_attempts)
                for r in rows]

    async def start_sender_code(
        self, *, establishment_id: int, user_id: int, address: str, code_hash: str,
        expires_at: float, now: float, min_interval: float, day_limit: int,
    ) -> float:
        sa, sends = t.sender_addresses, t.sender_code_sends
        key = address.lower()

        async def job(conn: AsyncConnection) -> float:
            last = (await conn.execute(select(func.max(sends.c.at)).where(
                sends.c.user_id == user_id, sends.c.address_key == key))).scalar()
            if last is not None and now - last < min_interval:
                return float(min_interval - (now - last))
            day = [r.at for r in await conn.execute(
                select(sends.c.at).where(sends.c.user_id == user_id, sends.c.at > now - 86400)
                .order_by(sends.c.at))]
            if len(day) >= day_limit:
                return float(day[len(day) - day_limit] + 86400 - now)
            await conn.execute(delete(sends).where(sends.c.user_id == user_id,
                                                   sends.c.at < now - 2 * 86400))
            res = await conn.execute(update(sa).where(sa.c.user_id == user_id,
                                                      sa.c.address_key == key).values(
                address=address, code_hash=code_hash, code_expires_at=expires_at,
                failed_attempts=0))
            if res.rowcount == 0:
                await conn.execute(insert(sa).values(
                    establishment_id=establishment_id, user_id=user_id, address=address,
                    address_key=key, code_hash=code_hash, code_expires_at=expires_at,
                    failed_attempts=0, created_at=now))
            await conn.execute(insert(sends).values(user_id=user_id, address_key=key, at=now))
            return 0.0

        result: float = await self.write(job)
        return result

    async def check_sender_code(
        self, *, user_id: int, address: str, code_hash: str, now: float, max_failures: int,
    ) -> tuple[str, int]:
        sa = t.sender_addresses
        where = (sa.c.user_id == user_id, sa.c.address_key == address.lower())

        async def job(conn: AsyncConnection) -> tuple[str, int]:
            row = (await conn.execute(select(sa).where(*where))).first()
            if row is None or row.code_hash is None:
                locked = row is not None and row.failed_attempts >= max_failures
                return ("locked" if locked else "no_code"), 0
            if row.code_expires_at is None or row.code_expires_at <= now:
                return "expired", 0
            if hmac.compare_digest(row.code_hash, code_hash):
                await conn.execute(update(sa).where(*where).values(
                    verified_at=now, code_hash=None, code_expires_at=None, failed_attempts=0))
                return "verified", max_failures
            failed = row.failed_attempts + 1
            if failed >= max_failures:
                # The code is void: whoever is guessing must ask for a new one, which the
                # owner of the address receives (and the resend limits slow down).
                await conn.execute(update(sa).where(*where).values(
                    failed_attempts=failed, code_hash=None, code_expires_at=None))
                return "locked", 0
            await conn.execute(update(sa).where(*where).values(failed_attempts=failed))
            return "wrong", max_failures - failed

        result: tuple[str, int] = await self.write(job)
        return result

    async def delete_sender_address(self, user_id: int, address: str) -> bool:
        sa = t.sender_addresses

        async def job(conn: AsyncConnection) -> int:
            res = await conn.execute(delete(sa).where(sa.c.user_id == user_id,
                                                      sa.c.address_key == address.lower()))
            return int(res.rowcount)

        return bool(await self.write(job))

    # -- failed sign-ins -------------------------------------------------------------------
    async def recent_failures(self, keys: Sequence[str], since: float) -> dict[str, list[float]]:
        lf = t.login_failures
        rows = await self._read(select(lf.c.key, lf.c.at)
                                .where(lf.c.key.in_(_keys(keys)), lf.c.at >= since)
                                .order_by(lf.c.at))
        out: dict[str, list[float]] = {}
        for row in rows:
            out.setdefault(row.key, []).append(row.at)
        return {key: out[stored] for key, stored in zip(keys, _keys(keys), strict=True)
                if stored in out}

    async def add_failure(self, keys: Sequence[str], now: float, forget_before: float) -> None:
        lf = t.login_failures
        stored = _keys(keys)

        async def job(conn: AsyncConnection) -> None:
            # These keys' old failures (their window is the caller's), and anyone's older
            # than any window, so that keys never seen again do not pile up.
            await conn.execute(delete(lf).where(lf.c.key.in_(stored), lf.c.at < forget_before))
            await conn.execute(delete(lf).where(lf.c.at < now - FAILURES_KEPT))
            await conn.execute(insert(lf), [{"key": k, "at": now} for k in stored])

        await self.write(job)

    async def clear_failures(self, keys: Sequence[str]) -> None:
        lf = t.login_failures

        async def job(conn: AsyncConnection) -> None:
            await conn.execute(delete(lf).where(lf.c.key.in_(_keys(keys))))

        await self.write(job)

    # -- ended sign-in sessions ------------------------------------------------------------
    async def end_session(self, session_id: str, expires_at: float, now: float) -> None:
        es = t.ended_sessions

        async def job(conn: AsyncConnection) -> None:
            await conn.execute(delete(es).where(es.c.expires_at < now))
            await conn.execute(self._dialect().insert(es).values(
                session_id=session_id, expires_at=expires_at).on_conflict_do_nothing())

        await self.write(job)

    async def session_ended(self, session_id: str) -> bool:
        es = t.ended_sessions
        return bool(await self._read(select(es.c.session_id)
                                     .where(es.c.session_id == session_id)))

    # -- relay sending limits ------------------------------------------------------------
    async def _relay_row(self, conn: AsyncConnection, relay_key: str, now: float) -> Any:
        """The relay's limits row, locked until the transaction ends (PostgreSQL; SQLite's
        writer holds the whole database already), created on first use."""
        stmt = (select(t.relay_limits).where(t.relay_limits.c.relay_key == relay_key)
                .with_for_update())
        row = (await conn.execute(stmt)).first()
        if row is None:
            from sqlalchemy.dialects import postgresql, sqlite

            dialect: Any = (postgresql if self.write_engine.dialect.name == "postgresql"
                            else sqlite)
            await conn.execute(
                dialect.insert(t.relay_limits)
                .values(relay_key=relay_key, next_start=0.0, paused_until=0.0, pause=0.0,
                        updated_at=now)
                .on_conflict_do_nothing()
            )
            row = (await conn.execute(stmt)).one()
        return row

    async def reserve_pace(self, asks: Sequence[PaceAsk]) -> PaceGrant:
        # The same order in every process, so that two transactions lock rows alike.
        order = sorted(range(len(asks)), key=lambda i: (asks[i].scope, asks[i].span))

        async def job(conn: AsyncConnection) -> PaceGrant:
            return await self._reserve_pace(conn, [asks[i] for i in order], order)

        result: PaceGrant = await self.write(job)
        return result

    async def _reserve_pace(self, conn: AsyncConnection, asks: list[PaceAsk],
                            order: list[int]) -> PaceGrant:
        u = t.api_usage.c
        await conn.execute(self._dialect().insert(t.api_usage).values([
            {"scope": a.scope, "span": a.span, "bucket": a.bucket, "amount": 0} for a in asks
        ]).on_conflict_do_nothing())
        key = tuple_(u.scope, u.span, u.bucket)
        rows = await conn.execute(
            select(u.scope, u.span, u.amount)
            .where(key.in_([(a.scope, a.span, a.bucket) for a in asks]))
            .order_by(u.scope, u.span).with_for_update())
        used = {(r.scope, r.span): int(r.amount) for r in rows}
        granted = [0] * len(asks)
        for i, a in enumerate(asks):
            held = used[(a.scope, a.span)]
            if held + a.need > a.limit:
                return PaceGrant([0] * len(asks), refused=order[i], used=held)
            granted[order[i]] = max(a.need, min(a.want, a.limit - held))
        for i, a in enumerate(asks):
            await conn.execute(
                update(t.api_usage)
                .where(u.scope == a.scope, u.span == a.span, u.bucket == a.bucket)
                .values(amount=u.amount + granted[order[i]]))
            await conn.execute(delete(t.api_usage).where(
                u.scope == a.scope, u.span == a.span, u.bucket < a.bucket))
        return PaceGrant(granted)

    async def reserve_relay(
        self, relay_key: str, limits: RelayLimits, recipients: Sequence[int], now: float,
        horizon: float,
    ) -> RelayGrant:
        async def job(conn: AsyncConnection) -> RelayGrant:
            return await self._reserve(conn, relay_key, limits, list(recipients), now, horizon)

        result: RelayGrant = await self.write(job)
        return result

    async def _reserve(
        self, conn: AsyncConnection, key: str, limits: RelayLimits, recipients: list[int],
        now: float, horizon: float,
    ) -> RelayGrant:
        row = await self._relay_row(conn, key, now)
        n = len(recipients)
        if row.paused_until > now:
            return RelayGrant([None] * n, ["pause"] * n, [row.paused_until] * n,
                              row.paused_until, row.pause, row.pause_error)
        u = t.relay_usage.c
        # Sliding windows out of buckets of 1/24 of the window: a bucket counts until every
        # e-mail it may hold has left the window, so no window of that length ever holds
        # more than the limit.
        spans = {"h": limits.hour / 24, "d": limits.day / 24}
        reach = {"h": limits.hour + spans["h"], "d": limits.day + spans["d"]}
        await conn.execute(delete(t.relay_usage).where(
            u.relay_key == key,
            ((u.kind == "h") & (u.bucket <= now - reach["h"]))
            | ((u.kind == "d") & (u.bucket <= now - reach["d"])),
        ))
        buckets: dict[str, list[tuple[float, int]]] = {"h": [], "d": []}
        for b in await conn.execute(
            select(u.kind, u.bucket, u.amount).where(u.relay_key == key).order_by(u.bucket)
        ):
            if b.kind in buckets:
                buckets[b.kind].append((float(b.bucket), int(b.amount)))
        used = {k: sum(a for _, a in v) for k, v in buckets.items()}

        def reopens(kind: str, limit: int, need: int) -> float:
            # When enough of the oldest buckets have left the window for ``need`` more.
            excess = used[kind] + need - limit
            for bucket, amount in buckets[kind]:
                excess -= amount
                if excess <= 0:
                    return bucket + reach[kind]
            return now + reach[kind]  # only this reservation's own usage: a full window

        interval = 60.0 / limits.per_minute if limits.per_minute else 0.0
        next_start = max(row.next_start, now)
        starts: list[float | None] = []
        blocked: list[str | None] = []
        resume: list[float] = []
        granted = {"h": 0, "d": 0}
        stop: tuple[str, float] | None = None  # pace and hour: first come, first served
        for count in recipients:
            refusal: tuple[str, float] | None = stop
            if refusal is None and limits.per_minute and next_start > now + horizon:
                refusal = stop = ("minute", next_start - horizon)
            if refusal is None and limits.per_hour and used["h"] + 1 > limits.per_hour:
                refusal = stop = ("hour", reopens("h", limits.per_hour, 1))
            if (refusal is None and limits.recipients_per_day and used["d"] > 0
                    and used["d"] + count > limits.recipients_per_day):
                # A single e-mail with more recipients than a whole day's limit goes
                # alone into an empty day rather than never.
                need = min(count, limits.recipients_per_day)
                refusal = ("day", reopens("d", limits.recipients_per_day, need))
            if refusal is not None:
                starts.append(None)
                blocked.append(refusal[0])
                resume.append(refusal[1])
                continue
            starts.append(next_start if interval else now)
            blocked.append(None)
            resume.append(0.0)
            if interval:
                next_start += interval
            used["h"] += 1
            used["d"] += count
            granted["h"] += 1
            granted["d"] += count
        for kind, amount in granted.items():
            if not amount:
                continue
            bucket = math.floor(now / spans[kind]) * spans[kind]
            res = await conn.execute(
                update(t.relay_usage)
                .where(u.relay_key == key, u.kind == kind, u.bucket == bucket)
                .values(amount=u.amount + amount)
            )
            if res.rowcount == 0:
                await conn.execute(insert(t.relay_usage).values(
                    relay_key=key, kind=kind, bucket=bucket, amount=amount))
        if interval and granted["h"]:
            await conn.execute(
                update(t.relay_limits).where(t.relay_limits.c.relay_key == key)
                .values(next_start=next_start, updated_at=now)
            )
        return RelayGrant(starts, blocked, resume, row.paused_until, row.pause,
                          row.pause_error)

    async def relay_pause(self, relay_key: str) -> RelayPause | None:
        rows = await self._read(
            select(t.relay_limits).where(t.relay_limits.c.relay_key == relay_key)
        )
        if not rows:
            return None
        return RelayPause(rows[0].paused_until, rows[0].pause, rows[0].pause_error)

    async def pause_relay(
        self, relay_key: str, now: float, pause: float, max_pause: float, error: str
    ) -> RelayPause:
        async def job(conn: AsyncConnection) -> RelayPause:
            row = await self._relay_row(conn, relay_key, now)
            length = row.pause or pause
            until, following = row.paused_until, row.pause
            if now >= row.paused_until:
                # Workers that saw the same reply together pause it once, not each.
                until, following = now + length, min(length * 2, max(max_pause, pause))
            await conn.execute(
                update(t.relay_limits).where(t.relay_limits.c.relay_key == relay_key)
                .values(paused_until=until, pause=following, pause_error=error,
                        updated_at=now)
            )
            return RelayPause(until, following, error)

        result: RelayPause = await self.write(job)
        return result

    async def relay_recovered(self, relay_key: str) -> None:
        async def job(conn: AsyncConnection) -> None:
            await conn.execute(
                update(t.relay_limits)
                .where(t.relay_limits.c.relay_key == relay_key, t.relay_limits.c.pause != 0)
                .values(pause=0.0, updated_at=time.time())
            )

        await self.write(job)

    # -- a relay's failing state, shared (failover, alerts) -------------------------------
    async def relay_health(self, relay_key: str, now: float, waiters_of: str | None = None,
                           holder: str = "") -> RelayHealth:
        lim, w = t.relay_limits.c, t.relay_waiters.c
        try:
            async with self.read_engine.connect() as conn:
                row = (await conn.execute(select(lim.failing_since, lim.recovered_at)
                                          .where(lim.relay_key == relay_key))).first()
                waiting: frozenset[int] = frozenset()
                if waiters_of is not None:
                    waiting = frozenset(int(r[0]) for r in await conn.execute(
                        select(w.establishment_id).distinct()
                        .where(w.relay_key == waiters_of, w.holder != holder,
                               w.seen_at >= now - WAITER_STALE)))
        except Exception as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        if row is None:
            return RelayHealth(waiting=waiting)
        return RelayHealth(row.failing_since, row.recovered_at, waiting)

    async def relay_failing(self, relay_key: str, now: float) -> float:
        async def job(conn: AsyncConnection) -> float:
            row = await self._relay_row(conn, relay_key, now)
            if row.failing_since is not None:
                return float(row.failing_since)
            await conn.execute(update(t.relay_limits)
                               .where(t.relay_limits.c.relay_key == relay_key)
                               .values(failing_since=now, updated_at=now))
            return now

        result: float = await self.write(job)
        return result

    async def relay_answered(self, relay_key: str, now: float) -> bool:
        lim = t.relay_limits.c

        async def job(conn: AsyncConnection) -> bool:
            res = await conn.execute(
                update(t.relay_limits)
                .where(lim.relay_key == relay_key, lim.failing_since.is_not(None))
                .values(failing_since=None, recovered_at=now, updated_at=now))
            return bool(res.rowcount)

        result: bool = await self.write(job)
        return result

    async def claim_relay_probe(self, relay_key: str, now: float, every: float) -> bool:
        lim = t.relay_limits.c

        async def job(conn: AsyncConnection) -> bool:
            await self._relay_row(conn, relay_key, now)
            res = await conn.execute(
                update(t.relay_limits)
                .where(lim.relay_key == relay_key, lim.probed_at <= now - every)
                .values(probed_at=now))
            return bool(res.rowcount)

        result: bool = await self.write(job)
        return result

    # -- a relay's connection slots (max_connections) ------------------------------------
    async def take_relay_slot(
        self, relay_key: str, max_connections: int, holder: str, now: float,
        lease_seconds: float, establishment_id: int = 0, *, queue: bool = False,
    ) -> int | None:
        rl = t.relay_leases.c

        async def job(conn: AsyncConnection) -> int | None:
            rows = (await conn.execute(
                select(rl.slot, rl.expires_at, rl.establishment_id)
                .where(rl.relay_key == relay_key))).all()
            live = [r for r in rows if r.expires_at > now]
            free = max_connections - len(live)
            waiter = _Waiter(relay_key, holder, establishment_id, now)
            if queue:
                held = collections.Counter(int(r.establishment_id) for r in live)
                free -= await waiter.ahead(conn, held)
            if free <= 0:
                if queue:
                    await waiter.wait(conn, self._dialect())
                return None
            slot = await self._take_free_slot(
                conn, relay_key, max_connections, holder, now, lease_seconds,
                establishment_id, {int(r.slot): r.expires_at > now for r in rows})
            if queue:
                await (waiter.done(conn) if slot is not None
                       else waiter.wait(conn, self._dialect()))
            return slot

        result: int | None = await self.write(job)
        return result

    async def _take_free_slot(
        self, conn: AsyncConnection, relay_key: str, max_connections: int, holder: str,
        now: float, lease_seconds: float, establishment_id: int, rows: dict[int, bool],
    ) -> int | None:
        """A slot not held (``rows``: the slots with a row, whether its lease is live)."""
        rl = t.relay_leases.c
        until = now + lease_seconds
        for slot in range(max_connections):
            if rows.get(slot):
                continue
            if slot in rows:
                # A dead holder's slot. The condition is checked again under the row
                # lock (PostgreSQL), so of two workers taking it over, one gets it.
                res = await conn.execute(
                    update(t.relay_leases)
                    .where(rl.relay_key == relay_key, rl.slot == slot, rl.expires_at <= now)
                    .values(holder=holder, expires_at=until,
                            establishment_id=establishment_id))
            else:
                res = await conn.execute(
                    self._dialect().insert(t.relay_leases)
                    .values(relay_key=relay_key, slot=slot, holder=holder,
                            expires_at=until, establishment_id=establishment_id)
                    .on_conflict_do_nothing())
            if res.rowcount == 1:
                return slot
        return None  # every free slot was taken meanwhile by other workers

    async def renew_relay_slots(
        self, holder: str, slots: Collection[tuple[str, int]], now: float,
        lease_seconds: float,
    ) -> set[tuple[str, int]]:
        rl = t.relay_leases.c
        by_relay: dict[str, list[int]] = {}
        for key, slot in slots:
            by_relay.setdefault(key, []).append(slot)

        async def job(conn: AsyncConnection) -> set[tuple[str, int]]:
            held: set[tuple[str, int]] = set()
            for key, numbers in by_relay.items():
                where = (rl.holder == holder, rl.relay_key == key, rl.slot.in_(numbers))
                await conn.execute(update(t.relay_leases).where(*where)
                                   .values(expires_at=now + lease_seconds))
                held.update((key, int(r.slot))
                            for r in await conn.execute(select(rl.slot).where(*where)))
            return held

        result: set[tuple[str, int]] = await self.write(job)
        return result

    async def release_relay_slot(self, relay_key: str, slot: int, holder: str,
                                 handed_round: float | None = None) -> None:
        rl, w = t.relay_leases.c, t.relay_waiters.c

        async def job(conn: AsyncConnection) -> None:
            await conn.execute(delete(t.relay_leases).where(
                rl.relay_key == relay_key, rl.slot == slot, rl.holder == holder))
            if handed_round is not None:
                # Given up for the others: this holder's own waits queue behind theirs.
                await conn.execute(update(t.relay_waiters)
                                   .where(w.relay_key == relay_key, w.holder == holder)
                                   .values(since=handed_round))

        await self.write(job)

    def _dialect(self) -> Any:
        """The backend's SQL dialect module (for ``insert ... on_conflict_do_nothing``)."""
        from sqlalchemy.dialects import postgresql, sqlite

        return postgresql if self.write_engine.dialect.name == "postgresql" else sqlite
