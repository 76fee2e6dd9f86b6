"""Prometheus metrics, derived from the store, and the readiness check.

Counters are **counts of rows in the store**, not in-process counters: a restart, a second
``postier serve`` or a ``postier worker`` on another machine all report the same numbers,
and nothing is lost when a process dies. What they count:

- ``postier_messages_accepted_total{establishment}``: messages stored (``messages`` rows);
- ``postier_messages_{sent,deferred,failed}_total{establishment}``: delivery attempts that
  ended in that state (``attempts.outcome``), so a message deferred three times then sent
  counts three deferrals and one sending;
- ``postier_delivery_latency_seconds``: for every attempt that sent a message, the time from
  its acceptance (``messages.created_at``) to the end of that attempt.

Retention deletes old rows; it records what it deleted in the same transaction
(``retention.purge`` entries of the audit log, see :mod:`postier.ops.retention`), and the
counters add those tallies back, so they never go down.

To stay cheap on a large queue, :class:`Collector` counts the old rows once and then only
the new ones: messages accepted more than a minute ago and attempts up to the newest id go
into a cached base; the rest is counted at every scrape. The base is recounted from
scratch every hour, which also repairs anything a clock jump made it miss. Only rows that
are in the base can be purged (they are at least a day old), so a purge between two
recounts changes nothing: the base already holds them.
Gauges (queue depth, oldest waiting message, relay state) are read live, from the
(establishment, status, created_at) index and the newest attempts.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import and_, case, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from postier import __version__
from postier.store import schema as t
from postier.store.base import DEFERRED, FAILED, QUEUED, SENDING, SENT, STATUSES
from postier.store.sql import SQLStore

# Upper bounds (seconds) of the latency histogram: a healthy relay answers within a second;
# a relay that is down makes e-mails wait minutes to days.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400,
)
OUTCOMES = (SENT, DEFERRED, FAILED)
WAITING = (QUEUED, SENDING, DEFERRED)
PURGE_ACTION = "retention.purge"

# Messages younger than this are counted at every scrape rather than cached: one accepted
# just before the boundary may not be committed yet.
TAIL_LAG = 60.0
# The cached base is recounted from scratch this often.
FULL_RECOUNT = 3600.0
# How many recent attempts tell the state of each relay.
RELAY_WINDOW = 500
# SMTP replies that mean the relay took the connection but will not take mail now: it is
# not "up" for us (closing, TLS or authentication refused).
_RELAY_DOWN_CODES = {421, 454, 530, 534, 535, 538}


# -- tallies -------------------------------------------------------------------------------


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


def _latency_expr() -> Any:
    a, m = t.attempts.c, t.messages.c
    return a.started_at + a.duration_ms / 1000.0 - m.created_at


async def count_attempts(conn: AsyncConnection, where: Any) -> Tally:
    """Outcomes by establishment and the latency histogram of the attempts ``where``
    selects (joined with their messages)."""
    a, m = t.attempts.c, t.messages.c
    latency = _latency_expr()
    sent = a.outcome == SENT
    columns = [
        m.establishment_id,
        a.outcome,
        func.count(),
        func.sum(case((sent, latency), else_=0.0)),
        *(func.sum(case((and_(sent, latency <= le), 1), else_=0)) for le in LATENCY_BUCKETS),
    ]
    stmt = (
        select(*columns)
        .select_from(t.attempts.join(t.messages, t.messages.c.id == a.message_id))
        .where(where)
        .group_by(m.establishment_id, a.outcome)
    )
    out = Tally()
    for row in await conn.execute(stmt):
        e, outcome, n, total, *cumulative = row
        key = (int(e), str(outcome))
        out.outcomes[key] = out.outcomes.get(key, 0) + int(n)
        if outcome == SENT:
            cum = [int(c or 0) for c in cumulative] + [int(n)]
            out.buckets = [
                acc + c - (cum[i - 1] if i else 0)
                for i, (acc, c) in enumerate(zip(out.buckets, cum, strict=True))
            ]
            out.latency_sum += float(total or 0.0)
    return out


async def count_accepted(conn: AsyncConnection, where: Any) -> dict[int, int]:
    m = t.messages.c
    rows = await conn.execute(
        select(m.establishment_id, func.count()).where(where).group_by(m.establishment_id)
    )
    return {int(e): int(n) for e, n in rows}


async def purged_tallies(conn: AsyncConnection, after_id: int = 0) -> tuple[Tally, int]:
    """What the retention purges deleted (audit entries after ``after_id``), and the last
    entry's id."""
    out = Tally()
    last = after_id
    rows = await conn.execute(
        select(t.audit_log.c.id, t.audit_log.c.establishment_id, t.audit_log.c.details)
        .where(t.audit_log.c.action == PURGE_ACTION, t.audit_log.c.id > after_id)
        .order_by(t.audit_log.c.id)
    )
    for audit_id, e, details in rows:
        last = max(last, int(audit_id))
        try:
            counted = json.loads(details).get("counted") or {}
        except (ValueError, AttributeError):
            continue
        out.add(Tally.load(int(e), counted))
    return out, last


# -- the collector -------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Everything one scrape shows."""

    establishments: dict[int, str]
    totals: Tally
    queue: dict[str, int]
    oldest_waiting: float | None
    relays: dict[str, bool]
    delivery: str | None = None


class Collector:
    """Reads the metrics from the store; keeps the cached base of the counters."""

    def __init__(self, store: SQLStore) -> None:
        self.store = store
        self._lock = asyncio.Lock()
        self._base: Tally | None = None
        self._base_at = 0.0
        self._msg_boundary = 0.0  # messages created before this are in the base
        self._att_boundary = 0  # attempts with an id up to this are in the base

    async def snapshot(self, now: float | None = None) -> Snapshot:
        async with self._lock:
            return await self._snapshot(time.time() if now is None else now)

    async def _snapshot(self, now: float) -> Snapshot:
        async with self.store.read_engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # One consistent view of the rows, the purge tallies and the gauges.
                conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                establishments = {
                    int(r.id): str(r.slug)
                    for r in await conn.execute(select(t.establishments.c.id,
                                                       t.establishments.c.slug))
                }
                ids = list(establishments)
                totals = await self._totals(conn, ids, now)
                queue, oldest = await waiting_messages(conn, ids)
                relays = await _relays(conn)
        return Snapshot(establishments, totals, queue, oldest, relays)

    async def _totals(self, conn: AsyncConnection, ids: list[int], now: float) -> Tally:
        m, a = t.messages.c, t.attempts.c
        # Every status and establishment named, so the index (establishment, status,
        # created_at) serves the time range.
        known = and_(m.establishment_id.in_(ids or [0]), m.status.in_(STATUSES))
        # Attempts are appended in id order: everything up to the newest id goes in the
        # base. (With several writers on PostgreSQL, a transaction committing out of id
        # order may be missed until the hourly recount: counted late, never twice.)
        att_boundary = int((await conn.execute(select(func.max(a.id)))).scalar() or 0)
        msg_boundary = now - TAIL_LAG

        if self._base is None or now - self._base_at > FULL_RECOUNT or now < self._base_at:
            base, _ = await purged_tallies(conn)
            base.accepted = _merge(base.accepted, await count_accepted(
                conn, and_(known, m.created_at < msg_boundary)))
            base.add(await count_attempts(conn, a.id <= att_boundary))
            self._base, self._base_at = base, now
            self._msg_boundary, self._att_boundary = msg_boundary, att_boundary
        else:
            base = self._base
            if msg_boundary > self._msg_boundary:
                base.accepted = _merge(base.accepted, await count_accepted(
                    conn, and_(known, m.created_at >= self._msg_boundary,
                               m.created_at < msg_boundary)))
            if att_boundary > self._att_boundary:
                base.add(await count_attempts(
                    conn, and_(a.id > self._att_boundary, a.id <= att_boundary)))
            self._msg_boundary = max(self._msg_boundary, msg_boundary)
            self._att_boundary = max(self._att_boundary, att_boundary)

        totals = base.copy()
        totals.accepted = _merge(totals.accepted, await count_accepted(
            conn, and_(known, m.created_at >= self._msg_boundary)))
        totals.add(await count_attempts(conn, a.id > self._att_boundary))
        return totals


def _merge(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
    out = dict(a)
    for k, n in b.items():
        out[k] = out.get(k, 0) + n
    return out


async def waiting_messages(
    conn: AsyncConnection, establishment_ids: Sequence[int]
) -> tuple[dict[str, int], float | None]:
    """Messages waiting by status, and the creation time of the oldest. Naming every
    establishment lets the (establishment, status, created_at) index answer alone."""
    m = t.messages.c
    queue = dict.fromkeys(WAITING, 0)
    oldest: float | None = None
    rows = await conn.execute(
        select(m.status, func.count(), func.min(m.created_at))
        .where(m.establishment_id.in_(list(establishment_ids) or [0]), m.status.in_(WAITING))
        .group_by(m.status)
    )
    for status, n, first in rows:
        queue[str(status)] = int(n)
        if first is not None:
            oldest = float(first) if oldest is None else min(oldest, float(first))
    return queue, oldest


async def _relays(conn: AsyncConnection) -> dict[str, bool]:
    """Each relay's state after its newest attempt: up when the relay took part in an SMTP
    transaction (any reply but closing, TLS or authentication refusals)."""
    a = t.attempts.c
    rows = await conn.execute(
        select(a.relay, a.code).order_by(a.id.desc()).limit(RELAY_WINDOW)
    )
    out: dict[str, bool] = {}
    for relay, code in rows:
        if relay not in out:
            out[str(relay)] = code is not None and int(code) not in _RELAY_DOWN_CODES
    return out


# -- exposition ----------------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)
                                  and abs(value) < 2**53):
        return str(int(value))
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str,
               samples: Iterable[tuple[str, dict[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for sample_name, labels, value in samples:
            self.lines.append(f"{sample_name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(snap: Snapshot, now: float | None = None) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    now = time.time() if now is None else now
    w = _Writer()
    names = snap.establishments
    w.family(
        "postier_messages_accepted_total", "counter",
        "E-mails accepted into the queue.",
        (("postier_messages_accepted_total", {"establishment": slug},
          snap.totals.accepted.get(e, 0)) for e, slug in sorted(names.items())),
    )
    helps = {
        SENT: "Delivery attempts that sent an e-mail (every recipient answered, one accepted).",
        DEFERRED: "Delivery attempts that left an e-mail waiting for a retry.",
        FAILED: "Delivery attempts after which an e-mail failed for good.",
    }
    for outcome in OUTCOMES:
        name = f"postier_messages_{outcome}_total"
        w.family(
            name, "counter", helps[outcome],
            ((name, {"establishment": slug}, snap.totals.outcomes.get((e, outcome), 0))
             for e, slug in sorted(names.items())),
        )
    w.family(
        "postier_queue_depth", "gauge", "E-mails waiting in the queue, by status.",
        (("postier_queue_depth", {"status": s}, snap.queue.get(s, 0)) for s in WAITING),
    )
    age = max(0.0, now - snap.oldest_waiting) if snap.oldest_waiting is not None else 0.0
    w.family(
        "postier_oldest_queued_age_seconds", "gauge",
        "Age of the oldest e-mail not yet sent nor failed (0 when none waits).",
        [("postier_oldest_queued_age_seconds", {}, round(age, 3))],
    )
    w.family(
        "postier_relay_up", "gauge",
        "Whether the SMTP relay took mail at its newest delivery attempt (1) or not (0).",
        (("postier_relay_up", {"relay": r}, 1 if up else 0)
         for r, up in sorted(snap.relays.items())),
    )
    cumulative = 0
    samples: list[tuple[str, dict[str, str], float]] = []
    for le, n in zip([*LATENCY_BUCKETS, math.inf], snap.totals.buckets, strict=True):
        cumulative += n
        samples.append(("postier_delivery_latency_seconds_bucket",
                        {"le": "+Inf" if math.isinf(le) else _number(float(le))}, cumulative))
    samples.append(("postier_delivery_latency_seconds_sum", {},
                    round(snap.totals.latency_sum, 3)))
    samples.append(("postier_delivery_latency_seconds_count", {}, cumulative))
    w.family(
        "postier_delivery_latency_seconds", "histogram",
        "Time from acceptance to the attempt that sent the e-mail.", samples,
    )
    if snap.delivery is not None:
        w.family(
            "postier_delivery_running", "gauge",
            "Whether this process's delivery workers run (absent with --no-delivery).",
            [("postier_delivery_running", {}, 1 if snap.delivery == "running" else 0)],
        )
    w.family("postier_build_info", "gauge", "Version of this Postier.",
             [("postier_build_info", {"version": __version__}, 1)])
    return w.text()


# -- readiness -----------------------------------------------------------------------------

READY_TIMEOUT = 5.0


async def probe_store(store: SQLStore, within: float = READY_TIMEOUT) -> str | None:
    """A tiny real write through the store's writer (same queue, same lock, same commit as
    an acceptance); None when it worked, else a short reason safe to show anyone."""
    from postier.errors import PostierError

    async def job(conn: AsyncConnection) -> None:
        first = select(func.min(t.establishments.c.id)).scalar_subquery()
        await conn.execute(
            update(t.establishments)
            .where(t.establishments.c.id == first)
            .values(disabled=t.establishments.c.disabled)
        )

    try:
        await asyncio.wait_for(store.write(job), within)
    except TimeoutError:
        return f"no commit within {within:g} s"
    except PostierError as exc:
        reason = exc.params.get("reason")
        return str(reason) if isinstance(reason, str) else exc.code
    except Exception as exc:  # the store is not open, or broken in another way
        return type(exc).__name__
    return None


def room_needed(max_message_size: int) -> int:
    """Free bytes an SQLite store needs to accept the largest e-mail it may be given: once
    in the write-ahead log, once more when the log is copied into the database file."""
    return 2 * max_message_size


def store_room(url: str, max_message_size: int) -> str | None:
    """Whether the disk holding an SQLite database can take one more e-mail of the largest
    size; None when it can (or for PostgreSQL, whose disk only the probe's write
    reaches), else a short reason safe to show anyone. Below this floor a submission may
    be refused with 507: readiness says so first."""
    if not url.startswith("sqlite") or ":memory:" in url:
        return None
    try:
        free = shutil.disk_usage(Path(url.split(":///", 1)[1]).parent).free
    except OSError:
        return None  # no such directory: the probe's write says what is wrong
    need = room_needed(max_message_size)
    if free >= need:
        return None
    # The threshold only, not the free space: anyone may ask, and watch a disk fill up.
    return (f"disk full: less than the {_mib(need)} an e-mail of "
            f"{_mib(max_message_size)} needs")


def _mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"


def delivery_state(worker: Any, enabled: bool) -> str:
    """``off`` when this process does not deliver, ``running`` or ``stopped``."""
    if not enabled:
        return "off"
    if worker is None or not getattr(worker, "running", False):
        return "stopped"
    # A worker whose claim or maintenance loop died would still say "running".
    tasks: Sequence[asyncio.Task[Any]] = getattr(worker, "_tasks", ())
    if any(task.done() for task in tasks):
        return "stopped"
    return "running"
