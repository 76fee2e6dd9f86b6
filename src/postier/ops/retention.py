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
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from postier.core.aio import cancel_and_wait
from postier.core.outage import Outage
from postier.core.reasons import explain_error
from postier.core.settings import RetentionSettings
from postier.errors import StoreUnavailable
from postier.store.base import (
    FAILURES_KEPT,
    FINAL_STATUSES,
    SIGN_IN_DOORS,
    MessageRecord,
    Store,
    User,
    account_key,
)
from postier.store.reports import Tally

if TYPE_CHECKING:
    from postier.core.service import Postier

log = logging.getLogger("postier.ops.retention")

DAY = 86400.0
BATCH = 500  # rows deleted per transaction
SCAN = 2000  # bodies looked at per read
T = TypeVar("T")


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
    store = core.store
    now = time.time() if now is None else now
    report = PurgeReport(dry_run=dry_run, at=now)
    rows = [(e, slug, _retention(data))
            for e, slug, _hosted, data in await store.settings_documents()]
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


def _retention(data: str | None) -> RetentionSettings:
    try:
        doc = json.loads(data) if data else {}
        return RetentionSettings.model_validate(doc.get("retention") or {})
    except (ValueError, AttributeError):
        log.warning("unreadable retention settings; using the defaults")
        return RetentionSettings()


async def retention_of(store: Store, establishment_id: int) -> RetentionSettings:
    return _retention(await store.settings_document(establishment_id))


async def _purge_bodies(
    store: Store, cutoffs: dict[int, float], dry_run: bool, batch: int
) -> dict[int, int]:
    """Remove the bodies of final messages past their establishment's cut-off.

    The scan follows the bodies table (small: bodies are what retention keeps short), in
    key order, joined with each body's message."""
    removed: dict[int, int] = {}
    after = ""
    while True:
        page = await store.body_page(after, SCAN)
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
                    n = await store.delete_final_bodies(e, chunk, cutoffs[e])
                    await asyncio.sleep(0)  # let the queue's writes in between
                removed[e] = removed.get(e, 0) + n
        if len(page) < SCAN:
            return removed
        after = page[-1][0]


async def _purge_records(
    store: Store, establishment_id: int, cutoff: float, *, dry_run: bool, batch: int,
    actor: str,
) -> int:
    """Remove the records of final messages past the cut-off, oldest first, in batches; one
    audit entry per run holds how many went and what they counted for the metrics."""
    if dry_run:
        return await store.count_purgeable(establishment_id, cutoff)
    audit_id: int | None = None
    messages = 0
    tally = Tally()
    before = _iso(cutoff)
    while True:
        n, written, total = await store.purge_records(
            establishment_id, cutoff, batch, actor=actor, before=before, audit_id=audit_id,
            purged=messages, counted=tally)
        if n:
            audit_id, tally, messages = written, total, messages + n
        if n < batch:
            return messages
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
    store = core.store
    retention = await retention_of(store, subject.establishment_id)
    got = await store.personal_data(subject.id, subject.establishment_id, subject.username)
    tokens = await store.list_tokens(subject.id)
    failed_sign_ins = await _failed_sign_ins(store, subject)
    return {
        "generated_at": _iso(time.time()),
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
            "explanation": RETENTION_EXPLANATION,
        },
        "tokens": [
            {"name": tk.name, "created_at": _iso(tk.created_at),
             "last_used_at": _iso(tk.last_used_at), "revoked_at": _iso(tk.revoked_at)}
            for tk in tokens
        ],
        "audit": [
            {"at": _iso(e.at), "actor": e.actor, "action": e.action, "target": e.target,
             "details": e.details}
            for e in got.audit
        ],
        "failed_sign_ins": failed_sign_ins,
        "messages": [_kept_message(record, record.id in got.kept, retention, lang)
                     for record in got.messages],
    }


RETENTION_EXPLANATION = (
    "An e-mail's body and attachments are removed body_days after it was sent, "
    "failed or was cancelled; its record (sender, recipients, subject, status, "
    "attempts) metadata_days after (at the next midnight UTC). An e-mail still "
    "waiting to be delivered is kept until it is sent, failed or cancelled."
)


async def _failed_sign_ins(store: Store, subject: User) -> list[dict[str, Any]]:
    """Failed sign-ins for this account (the throttling's, kept a day at most): each door
    counts every one under the account's key, however the account was named."""
    doors = {account_key(door, subject.establishment_id, subject.username): door
             for door in SIGN_IN_DOORS}
    failures = await store.recent_failures(list(doors), time.time() - FAILURES_KEPT)
    return sorted(({"at": _iso(at), "door": doors[key]}
                   for key, times in failures.items() for at in times),
                  key=lambda f: str(f["at"]))


def _kept_message(record: MessageRecord, body_kept: bool, retention: RetentionSettings,
                  lang: str) -> dict[str, Any]:
    """One e-mail as the right of access shows it, with when retention removes it."""
    final = record.status in FINAL_STATUSES
    final_at = record.updated_at if final else None
    return {
        "id": record.id,
        "status": record.status,
        "created_at": _iso(record.created_at),
        "final_at": _iso(final_at),
        "sender": record.header_from,
        "envelope_from": record.envelope_from,
        "subject": record.subject,
        "message_id": record.message_id,
        "size": record.size,
        "attempts": record.attempts,
        "last_error": explain_error(record.last_error, lang),
        "recipients": [{"address": r.address, "status": r.status, "code": r.code,
                        "reply": r.reply} for r in record.recipients],
        "history": [{"at": _iso(h.started_at), "duration_ms": h.duration_ms,
                     "relay": h.relay, "outcome": h.outcome, "code": h.code,
                     "detail": h.detail} for h in record.history],
        "body_kept": body_kept,
        "body_removal_at": _iso(body_removal(retention, final_at))
        if final_at is not None and body_kept else None,
        "metadata_removal_at": _iso(metadata_removal(retention, final_at))
        if final_at is not None else None,
    }
