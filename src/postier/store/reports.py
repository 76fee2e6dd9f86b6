"""The reports part of the store: what the metrics count, what retention removes and
what it keeps about a person, what ``postier doctor`` checks, and the queue page's chart
and search (the SQL is in :mod:`postier.store.sql_reports` and
:mod:`postier.store.sql_retention`)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from postier.store.records import (
    DEFERRED,
    FAILED,
    QUEUED,
    SENDING,
    SENT,
    AuditEntry,
    MessageRecord,
)

# Upper bounds (seconds) of the latency histogram: a healthy relay answers within a second;
# a relay that is down makes e-mails wait minutes to days.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400,
)
OUTCOMES = (SENT, DEFERRED, FAILED)
WAITING = (QUEUED, SENDING, DEFERRED)
# The action of the audit entries where the retention purge records what it deleted.
PURGE_ACTION = "retention.purge"


@dataclass
class Tally:
    """Counts by establishment id, and the latency histogram (per bucket, not cumulative;
    the last bucket is +Inf)."""

    accepted: dict[int, int] = field(default_factory=dict)
    outcomes: dict[tuple[int, str], int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def add(self, other: Tally) -> None:
        for e, n in other.accepted.items():
            self.accepted[e] = self.accepted.get(e, 0) + n
        for k, n in other.outcomes.items():
            self.outcomes[k] = self.outcomes.get(k, 0) + n
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.latency_sum += other.latency_sum

    def copy(self) -> Tally:
        out = Tally()
        out.add(self)
        return out

    def dump(self, establishment_id: int) -> dict[str, Any]:
        """The part of one establishment, as the retention purge stores it."""
        return {
            "accepted": self.accepted.get(establishment_id, 0),
            **{o: self.outcomes.get((establishment_id, o), 0) for o in OUTCOMES},
            "latency": {"le": list(LATENCY_BUCKETS), "counts": self.buckets,
                        "sum": self.latency_sum},
        }

    @classmethod
    def load(cls, establishment_id: int, doc: dict[str, Any]) -> Tally:
        out = cls()
        out.accepted[establishment_id] = int(doc.get("accepted", 0))
        for o in OUTCOMES:
            out.outcomes[(establishment_id, o)] = int(doc.get(o, 0))
        lat = doc.get("latency") or {}
        les = [float(x) for x in lat.get("le", [])] + [math.inf]
        for le, n in zip(les, lat.get("counts", []), strict=False):
            # Buckets stored by another version: each goes to the smallest bucket of ours
            # that holds it (never under-counted in a bucket).
            out.buckets[bisect.bisect_left(LATENCY_BUCKETS, le)] += int(n)
        out.latency_sum = float(lat.get("sum", 0.0))
        return out


@dataclass
class MetricsRead:
    """One consistent read of what the metrics show: the establishments (id: slug), the
    newest attempt's id, the counts that go into the cached base (``counted``), those
    counted at every scrape (``tail``), the e-mails waiting by status and the oldest's
    creation time, and the (relay, reply code) of the newest attempts, newest first."""

    establishments: dict[int, str]
    att_boundary: int
    counted: Tally
    tail: Tally
    queue: dict[str, int]
    oldest_waiting: float | None
    replies: list[tuple[str, int | None]]


@dataclass
class PersonalData:
    """What the store keeps about a user: their e-mails (with recipients and attempts),
    the ids of those whose body is still kept, and the audit entries naming them."""

    messages: list[MessageRecord]
    kept: set[str]
    audit: list[AuditEntry]


@dataclass
class MessageRow:
    """An e-mail as the queue page lists it."""

    id: str
    status: str
    subject: str
    sender: str
    envelope_from: str
    created_at: float
    updated_at: float
    next_attempt_at: float
    attempts: int
    last_error: str | None
    recipients: list[str] = field(default_factory=list)


class ReportStore(Protocol):
    """Reads for the operators (metrics, doctor, the queue page) and the retention purge."""

    # -- metrics -------------------------------------------------------------------------
    async def read_metrics(self, msg_boundary: float, since: tuple[float, int] | None
                           ) -> MetricsRead:
        """Everything one scrape reads, in one consistent view. ``counted``: with ``since``
        None, every count up to the boundaries (e-mails accepted before ``msg_boundary``,
        attempts up to the newest id, and what the purges deleted); else only what is new
        between the base's boundaries ``since`` (accepted-before time, attempt id) and
        these. ``tail``: what comes after the boundaries."""

    async def probe_writer(self) -> None:
        """A tiny real write through the store's writer (same queue, same lock, same
        commit as an acceptance): a row changed to its own value."""

    # -- postier doctor ------------------------------------------------------------------
    async def migration_status(self) -> tuple[str | None, str]:
        """(the database's revision, the newest revision); database errors as they are."""

    async def probe_write_access(self) -> None:
        """Take the write lock and change a row to its own value, then roll back."""

    async def waiting_now(self) -> tuple[dict[str, int], float | None]:
        """E-mails waiting by status, and the creation time of the oldest."""

    async def stored_secrets(self) -> tuple[list[str], list[str]]:
        """The stored JSON documents that may hold encrypted values (settings, profiles),
        and every other encrypted value stored (``*_enc`` columns, the key check value)."""

    async def misplaced_operators(self, operators_establishment: int
                                  ) -> tuple[int, list[tuple[str, str]]]:
        """How many establishments there are, and the (establishment slug, username) of
        the operator accounts outside ``operators_establishment``."""

    async def newest_activity(self) -> float | None:
        """When the newest e-mail was accepted or attempt started (None: neither)."""

    # -- the queue page ------------------------------------------------------------------
    async def activity_by_hour(self, establishment_id: int, start: float,
                               outcomes: Sequence[str]) -> list[tuple[int, str, int]]:
        """The establishment's delivery attempts since ``start`` with one of ``outcomes``:
        (hours since ``start``, outcome, how many)."""

    async def search_messages(
        self, establishment_id: int, *, status: str | None = None, sender: str | None = None,
        recipient: str | None = None, since: float | None = None, until: float | None = None,
        limit: int = 200,
    ) -> list[MessageRow]:
        """The establishment's e-mails, newest first: of ``status``, whose sender or a
        recipient holds ``sender`` or ``recipient`` (any case), created from ``since`` to
        before ``until``."""

    # -- retention -----------------------------------------------------------------------
    async def settings_documents(self, *, disabled: bool = True
                                 ) -> list[tuple[int, str, bool, str | None]]:
        """(id, slug, hosted, stored settings document or None) of every establishment
        (without the disabled ones unless ``disabled``), by id."""

    async def settings_document(self, establishment_id: int) -> str | None:
        """The establishment's stored settings document, as stored."""

    async def body_page(self, after: str, limit: int) -> list[tuple[str, int, str, float]]:
        """Up to ``limit`` kept bodies after the message id ``after``, in id order: (id,
        establishment, status, updated at) of their e-mails."""

    async def delete_final_bodies(self, establishment_id: int, ids: Sequence[str],
                                  cutoff: float) -> int:
        """Delete the bodies of ``ids`` still final since before ``cutoff``; how many."""

    async def count_purgeable(self, establishment_id: int, cutoff: float) -> int:
        """How many records of e-mails final since before ``cutoff`` a purge would delete."""

    async def purge_records(
        self, establishment_id: int, cutoff: float, batch: int, *, actor: str,
        before: str | None, audit_id: int | None, purged: int, counted: Tally,
    ) -> tuple[int, int | None, Tally]:
        """Delete one batch of the oldest such records, and in the same transaction write
        the run's audit entry (``audit_id``, None for the run's first batch): ``before``,
        ``purged`` plus this batch, and ``counted`` plus what this batch counted for the
        metrics. Returns how many went, the audit entry's id and the new total."""

    async def personal_data(self, user_id: int, establishment_id: int, username: str
                            ) -> PersonalData:
        """Everything kept about a user's e-mails, and the audit entries naming them."""
