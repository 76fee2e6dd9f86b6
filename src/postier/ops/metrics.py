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
Gauges (queue depth, oldest waiting message, relay state, bounces on record and addresses
on the suppression lists) are read live, from the (establishment, status, created_at)
index, the newest attempts and the bounce tables.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postier import __version__
from postier.errors import PostierError
from postier.store.base import DEFERRED, FAILED, SENT, Store
from postier.store.reports import LATENCY_BUCKETS, OUTCOMES, PURGE_ACTION, WAITING, Tally

__all__ = ["LATENCY_BUCKETS", "OUTCOMES", "PURGE_ACTION", "WAITING", "Collector", "Snapshot",
           "Tally", "delivery_state", "probe_store", "render", "room_needed", "store_room"]

# Messages younger than this are counted at every scrape rather than cached: one accepted
# just before the boundary may not be committed yet.
TAIL_LAG = 60.0
# The cached base is recounted from scratch this often.
FULL_RECOUNT = 3600.0
# SMTP replies that mean the relay took the connection but will not take mail now: it is
# not "up" for us (closing, TLS or authentication refused).
_RELAY_DOWN_CODES = {421, 454, 530, 534, 535, 538}


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
    bounces: dict[tuple[int, str], int] = field(default_factory=dict)
    suppressed: dict[int, int] = field(default_factory=dict)


class Collector:
    """Reads the metrics from the store; keeps the cached base of the counters."""

    def __init__(self, store: Store) -> None:
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
        msg_boundary = now - TAIL_LAG
        full = self._base is None or now - self._base_at > FULL_RECOUNT or now < self._base_at
        since = None if full else (self._msg_boundary, self._att_boundary)
        read = await self.store.read_metrics(msg_boundary, since)
        if self._base is None or since is None:
            self._base, self._base_at = read.counted, now
            self._msg_boundary, self._att_boundary = msg_boundary, read.att_boundary
        else:
            self._base.add(read.counted)
            self._msg_boundary = max(self._msg_boundary, msg_boundary)
            self._att_boundary = max(self._att_boundary, read.att_boundary)
        totals = self._base.copy()
        totals.add(read.tail)
        bounces, suppressed = await self.store.bounce_tallies()
        return Snapshot(read.establishments, totals, read.queue, read.oldest_waiting,
                        _relay_states(read.replies), bounces=bounces, suppressed=suppressed)


def _relay_states(replies: list[tuple[str, int | None]]) -> dict[str, bool]:
    """Each relay's state after its newest attempt (``replies``: newest first): up when the
    relay took part in an SMTP transaction (any reply but closing, TLS or authentication
    refusals)."""
    out: dict[str, bool] = {}
    for relay, code in replies:
        if relay not in out:
            out[relay] = code is not None and code not in _RELAY_DOWN_CODES
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
    w.family(
        "postier_bounces", "gauge",
        "Bounces on record (purged with their e-mails), by kind: hard, soft, complaint.",
        (("postier_bounces", {"establishment": names.get(e, str(e)), "kind": k}, n)
         for (e, k), n in sorted(snap.bounces.items())),
    )
    w.family(
        "postier_suppressed_addresses", "gauge",
        "Addresses on the establishment's suppression list.",
        (("postier_suppressed_addresses", {"establishment": names.get(e, str(e))}, n)
         for e, n in sorted(snap.suppressed.items())),
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


async def probe_store(store: Store, within: float = READY_TIMEOUT) -> str | None:
    """A tiny real write through the store's writer (same queue, same lock, same commit as
    an acceptance); None when it worked, else a short reason safe to show anyone."""
    try:
        await asyncio.wait_for(store.probe_writer(), within)
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
