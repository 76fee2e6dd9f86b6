"""Retention of personal data (RGPD): old e-mails are removed, and people can see what is kept.

Each establishment chooses (``retention`` in its delivery settings) how long an e-mail is
kept once it is **final** (sent, failed or cancelled; its ``updated_at`` is then the time it
became final):

- ``body_days`` (default 30): then its body and attachments (``message_bodies``) go; the
  delivery record stays, and the API says ``body_kept: false``;
- ``metadata_days`` (default 365): then the record goes too (``messages``, ``recipients``,
  ``attempts``). This cut-off is rounded down to midnight UTC, so records leave once a day
  and the audit log gets one ``retention.purge`` entry per establishment and day at most.

A message that is not final is never touched, whatever its age. The work is done in small
batches, each its own short transaction through the store's writer, so acceptances and
deliveries are never held up; ``postier serve`` runs :class:`RetentionTask` every
``POSTIER_RETENTION_INTERVAL`` seconds (an hour), and ``postier purge`` on demand.

Each metadata batch also records, in the same transaction, what the deleted rows counted
for the metrics (``counted`` in the audit entry), so the Prometheus counters, which are
derived from the rows (see :mod:`postier.ops.metrics`), never go down.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from postier.core.aio import cancel_and_wait
from postier.core.outage import Outage
from postier.core.settings import RetentionSettings
from postier.errors import StoreUnavailable
from postier.ops.metrics import PURGE_ACTION, Tally, count_attempts
from postier.store import schema as t
from postier.store.base import (
    FAILURES_KEPT,
    FINAL_STATUSES,
    SIGN_IN_DOORS,
    User,
    account_key,
)
from postier.store.sql import SQLStore

if TYPE_CHECKING:
    from postier.core.service import Postier

log = logging.getLogger("postier.ops.retention")

DAY = 86400.0
BATCH = 500  # rows deleted per transaction
SCAN = 2000  # bodies looked at per read
T = TypeVar("T")


def sql_store(core: Postier) -> SQLStore:
    store = core.store
    if not isinstance(store, SQLStore):  # pragma: no cover - every backend is SQL today
        raise TypeError(f"{type(store).__name__} is not an SQL store")
    return store


async def _reading(store: SQLStore, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Run ``work`` on one read connection (one consistent view); database trouble becomes
    the usual "try again later" error."""
    try:
        async with store.read_engine.connect() as conn, conn.begin():
            return await work(conn)
    except DBAPIError as exc:
        text = str(exc.orig or exc).lower()
        reason = "database locked" if ("locked" in text or "busy" in text) else "database error"
        raise StoreUnavailable(reason=reason) from exc


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# -- dates ---------------------------------------------------------------------------------


def body_cutoff(retention: RetentionSettings, now: float) -> float:
    """Final before this time: the body goes."""
    return now - retention.body_days * DAY


def metadata_cutoff(retention: RetentionSettings, now: float) -> float:
    """Final before this time: the record goes (midnight UTC, so once a day)."""
    return math.floor((now - retention.metadata_days * DAY) / DAY) * DAY


def body_removal(retention: RetentionSettings, final_at: float) -> float:
    return final_at + retention.body_days * DAY


def metadata_removal(retention: RetentionSettings, final_at: float) -> float:
    return (math.floor(final_at / DAY) + 1) * DAY + retention.metadata_days * DAY


# -- purge ---------------------------------------------------------------------------------


@dataclass
class EstablishmentPurge:
    slug: str
    body_days: int
    metadata_days: int
    bodies: int = 0  # bodies removed (or that would be)
    messages: int = 0  # records removed (or that would be)


@dataclass
class PurgeReport:
    dry_run: bool
    at: float
    establishments: list[EstablishmentPurge] = field(default_factory=list)

    @property
    def bodies(self) -> int:
        return sum(e.bodies for e in self.establishments)

    @property
    def messages(self) -> int:
        return sum(e.messages for e in self.establishments)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "bodies": self.bodies,
            "messages": self.messages,
            "establishments": [e.__dict__ for e in self.establishments],
        }


async def purge(
    core: Postier,
    *,
    now: float | None = None,
    dry_run: bool = False,
    actor: str = "retention",
    batch: int = BATCH,
) -> PurgeReport:
    """Apply every establishment's retention once (or count what it would remove)."""
    store = sql_store(core)
    now = time.time() if now is None else now
    report = PurgeReport(dry_run=dry_run, at=now)
    rows = await _reading(store, _establishments)
    by_id: dict[int, EstablishmentPurge] = {}
    settings: dict[int, RetentionSettings] = {}
    for e, slug, r in rows:
        settings[e] = r
        by_id[e] = EstablishmentPurge(slug, r.body_days, r.metadata_days)
        report.establishments.append(by_id[e])
    cutoffs = {e: body_cutoff(r, now) for e, r in settings.items()}
    for e, n in (await _purge_bodies(store, cutoffs, dry_run, batch)).items():
        by_id[e].bodies += n
    for e, r in settings.items():
        by_id[e].messages = await _purge_records(
            store, e, metadata_cutoff(r, now), dry_run=dry_run, batch=batch, actor=actor
        )
    return report


async def _establishments(conn: AsyncConnection) -> list[tuple[int, str, RetentionSettings]]:
    """Every establishment (disabled ones too) with its retention settings, read from the
    stored settings document (no secret needed for that)."""
    rows = await conn.execute(
        select(t.establishments.c.id, t.establishments.c.slug, t.settings.c.data)
        .select_from(t.establishments.outerjoin(
            t.settings, t.settings.c.establishment_id == t.establishments.c.id))
        .order_by(t.establishments.c.id)
    )
    return [(int(i), str(s), _retention(d)) for i, s, d in rows]


def _retention(data: str | None) -> RetentionSettings:
    try:
        doc = json.loads(data) if data else {}
        return RetentionSettings.model_validate(doc.get("retention") or {})
    except (ValueError, AttributeError):
        log.warning("unreadable retention settings; using the defaults")
        return RetentionSettings()


async def retention_of(store: SQLStore, establishment_id: int) -> RetentionSettings:
    async def read(conn: AsyncConnection) -> RetentionSettings:
        data = (await conn.execute(select(t.settings.c.data).where(
            t.settings.c.establishment_id == establishment_id))).scalar()
        return _retention(data)

    return await _reading(store, read)


def _final_before(establishment_id: int, cutoff: float) -> Any:
    m = t.messages.c
    return and_(
        m.establishment_id == establishment_id,
        m.status.in_(FINAL_STATUSES),
        m.updated_at < cutoff,
    )


async def _purge_bodies(
    store: SQLStore, cutoffs: dict[int, float], dry_run: bool, batch: int
) -> dict[int, int]:
    """Remove the bodies of final messages past their establishment's cut-off.

    The scan follows the bodies table (small: bodies are what retention keeps short), in
    key order, joined with each body's message."""
    b, m = t.bodies.c, t.messages.c
    removed: dict[int, int] = {}
    after = ""
    while True:
        page = await _reading(store, functools.partial(_body_page, after=after))
        due: dict[int, list[str]] = {}
        for message_id, e, status, updated_at in page:
            cutoff = cutoffs.get(e)
            if cutoff is not None and status in FINAL_STATUSES and updated_at < cutoff:
                due.setdefault(e, []).append(message_id)
        for e, ids in due.items():
            for chunk in _chunks(ids, batch):
                if dry_run:
                    n = len(chunk)
                else:
                    # Checked again inside the transaction: an e-mail retried meanwhile is
                    # no longer final and keeps its body.
                    still = select(m.id).where(m.id.in_(chunk), _final_before(e, cutoffs[e]))

                    async def job(conn: AsyncConnection, still: Any = still) -> int:
                        res = await conn.execute(delete(t.bodies).where(b.message_id.in_(still)))
                        return int(res.rowcount)

                    n = await store.write(job)
                    await asyncio.sleep(0)  # let the queue's writes in between
                removed[e] = removed.get(e, 0) + n
        if len(page) < SCAN:
            return removed
        after = page[-1][0]


async def _body_page(conn: AsyncConnection, *, after: str) -> list[tuple[str, int, str, float]]:
    b, m = t.bodies.c, t.messages.c
    rows = await conn.execute(
        select(b.message_id, m.establishment_id, m.status, m.updated_at)
        .select_from(t.bodies.join(t.messages, m.id == b.message_id))
        .where(b.message_id > after)
        .order_by(b.message_id)
        .limit(SCAN)
    )
    return [(str(i), int(e), str(s), float(u)) for i, e, s, u in rows]


async def _purge_records(
    store: SQLStore, establishment_id: int, cutoff: float, *, dry_run: bool, batch: int,
    actor: str,
) -> int:
    """Remove the records of final messages past the cut-off, oldest first, in batches; one
    audit entry per run holds how many went and what they counted for the metrics."""
    m = t.messages.c
    # created_at <= updated_at: the extra bound lets the (establishment, status,
    # created_at) index find the candidates without reading the whole history.
    cond = and_(_final_before(establishment_id, cutoff), m.created_at < cutoff)
    if dry_run:

        async def count(conn: AsyncConnection) -> int:
            return int((await conn.execute(select(func.count()).where(cond))).scalar() or 0)

        return await _reading(store, count)

    state: dict[str, Any] = {"audit_id": None, "messages": 0, "tally": Tally()}
    before = _iso(cutoff)
    while True:

        async def job(conn: AsyncConnection) -> tuple[int, Any, Tally]:
            # Rows another process is purging right now are skipped (PostgreSQL); SQLite
            # has a single writer anyway.
            ids = [
                r[0]
                for r in await conn.execute(
                    select(m.id).where(cond).order_by(m.created_at).limit(batch)
                    .with_for_update(skip_locked=True)
                )
            ]
            if not ids:
                return 0, state["audit_id"], state["tally"]
            tally = await count_attempts(conn, t.attempts.c.message_id.in_(ids))
            tally.accepted = {establishment_id: len(ids)}
            for table, column in ((t.attempts, t.attempts.c.message_id),
                                  (t.recipients, t.recipients.c.message_id),
                                  (t.bodies, t.bodies.c.message_id)):
                await conn.execute(delete(table).where(column.in_(ids)))
            await conn.execute(delete(t.messages).where(m.id.in_(ids)))
            total = state["tally"].copy()
            total.add(tally)
            details = json.dumps({
                "before": before,
                "messages": state["messages"] + len(ids),
                "counted": total.dump(establishment_id),
            }, sort_keys=True)
            audit_id = state["audit_id"]
            if audit_id is None:
                res = await conn.execute(insert(t.audit_log).values(
                    establishment_id=establishment_id, at=time.time(), actor=actor,
                    action=PURGE_ACTION, target="", details=details,
                ))
                audit_id = int(res.inserted_primary_key[0])  # type: ignore[index]
            else:
                await conn.execute(update(t.audit_log).where(t.audit_log.c.id == audit_id)
                                   .values(details=details))
            return len(ids), audit_id, total

        n, audit_id, total = await store.write(job)
        if n:
            state.update(audit_id=audit_id, tally=total, messages=state["messages"] + n)
        if n < batch:
            return int(state["messages"])
        await asyncio.sleep(0)


def _iso(ts: float | None) -> str | None:
    """UTC ISO 8601, as the API writes times."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class RetentionTask:
    """The background purge of ``postier serve``: soon after start, then every
    ``interval`` seconds; a failure is logged and tried again at the next round."""

    def __init__(self, core: Postier, interval: float = 3600.0) -> None:
        self.core = core
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self.last: PurgeReport | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="postier-retention")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        await asyncio.sleep(min(60.0, self.interval))
        outage = Outage("retention purge")
        while True:
            try:
                self.last = report = await purge(self.core)
                outage.worked()
                if report.bodies or report.messages:
                    log.info("retention: %d bodies and %d e-mail records removed",
                             report.bodies, report.messages)
            except StoreUnavailable as exc:
                # Said once per outage; the purge waits for the database, then its round.
                await asyncio.sleep(outage.failed(exc))
                continue
            except Exception:
                log.exception("retention purge failed; will try again")
            await asyncio.sleep(self.interval)


# -- what is kept about a user ---------------------------------------------------------------


async def user_data(core: Postier, subject: User, lang: str = "en") -> dict[str, Any]:
    """Everything the store keeps about ``subject``'s e-mails and account, with the dates
    retention will remove it: the answer to a person's right of access."""
    from postier.core.service import explain_error

    iso = _iso

    store = sql_store(core)
    retention = await retention_of(store, subject.establishment_id)
    m, r, a, b = t.messages.c, t.recipients.c, t.attempts.c, t.bodies.c

    async def read(conn: AsyncConnection) -> dict[str, Any]:
        messages = (await conn.execute(
            select(t.messages).where(m.user_id == subject.id)
            .order_by(m.created_at.desc(), m.id.desc())
        )).all()
        ids = [row.id for row in messages]
        recipients: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        attempts: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        kept: set[str] = set()
        for chunk in _chunks(ids, 500):
            for row in await conn.execute(
                select(t.recipients).where(r.message_id.in_(chunk))
                .order_by(r.message_id, r.position)
            ):
                recipients[row.message_id].append({
                    "address": row.address, "status": row.status, "code": row.code,
                    "reply": row.reply,
                })
            for row in await conn.execute(
                select(t.attempts).where(a.message_id.in_(chunk)).order_by(a.id)
            ):
                attempts[row.message_id].append({
                    "at": iso(row.started_at), "duration_ms": row.duration_ms,
                    "relay": row.relay, "outcome": row.outcome, "code": row.code,
                    "detail": row.detail,
                })
            kept.update(x for (x,) in await conn.execute(
                select(b.message_id).where(b.message_id.in_(chunk))))
        audit = (await conn.execute(
            select(t.audit_log)
            .where(t.audit_log.c.establishment_id == subject.establishment_id,
                   or_(t.audit_log.c.actor == subject.username,
                       t.audit_log.c.target == subject.username))
            .order_by(t.audit_log.c.id)
        )).all()
        return {"messages": messages, "recipients": recipients, "attempts": attempts,
                "kept": kept, "audit": audit}

    got = await _reading(store, read)
    tokens = await core.store.list_tokens(subject.id)
    # Failed sign-ins for this account (the throttling's, kept a day at most): each door
    # counts every one under the account's key, however the account was named.
    doors = {account_key(door, subject.establishment_id, subject.username): door
             for door in SIGN_IN_DOORS}
    failures = await core.store.recent_failures(list(doors), time.time() - FAILURES_KEPT)
    failed_sign_ins = sorted(({"at": iso(at), "door": doors[key]}
                              for key, times in failures.items() for at in times),
                             key=lambda f: str(f["at"]))
    out_messages = []
    for row in got["messages"]:
        final = row.status in FINAL_STATUSES
        final_at = row.updated_at if final else None
        out_messages.append({
            "id": row.id,
            "status": row.status,
            "created_at": iso(row.created_at),
            "final_at": iso(final_at),
            "sender": row.header_from,
            "envelope_from": row.envelope_from,
            "subject": row.subject,
            "message_id": row.message_id,
            "size": row.size,
            "attempts": row.attempts,
            "last_error": explain_error(row.last_error, lang),
            "recipients": got["recipients"][row.id],
            "history": got["attempts"][row.id],
            "body_kept": row.id in got["kept"],
            "body_removal_at": iso(body_removal(retention, final_at))
            if final_at is not None and row.id in got["kept"] else None,
            "metadata_removal_at": iso(metadata_removal(retention, final_at))
            if final_at is not None else None,
        })
    return {
        "generated_at": iso(time.time()),
        "user": {
            "username": subject.username,
            "email": subject.email,
            "name": subject.display_name,
            "role": subject.role,
            "disabled": subject.disabled,
            "granted_senders": list(subject.granted_senders),
        },
        "retention": {
            "body_days": retention.body_days,
            "metadata_days": retention.metadata_days,
            "explanation": (
                "An e-mail's body and attachments are removed body_days after it was sent, "
                "failed or was cancelled; its record (sender, recipients, subject, status, "
                "attempts) metadata_days after (at the next midnight UTC). An e-mail still "
                "waiting to be delivered is kept until it is sent, failed or cancelled."
            ),
        },
        "tokens": [
            {"name": tk.name, "created_at": iso(tk.created_at),
             "last_used_at": iso(tk.last_used_at), "revoked_at": iso(tk.revoked_at)}
            for tk in tokens
        ],
        "audit": [
            {"at": iso(e.at), "actor": e.actor, "action": e.action, "target": e.target,
             "details": json.loads(e.details or "{}")}
            for e in got["audit"]
        ],
        "failed_sign_ins": failed_sign_ins,
        "messages": out_messages,
    }
