"""The queue page's figures: delivery activity per time bucket (the chart) and the filtered
message list (status, sender, recipient, date), read from the store's reports
(:class:`postier.store.reports.ReportStore`); neither writes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from postier.store.base import Store
from postier.store.reports import MessageRow as Row

__all__ = ["OUTCOMES", "PERIODS", "Bucket", "Filters", "Row", "activity", "buckets", "search"]

HOUR = 3600
# period key -> (number of buckets, bucket size: "hour" or "day")
PERIODS: dict[str, tuple[int, str]] = {"24h": (24, "hour"), "7d": (7, "day"),
                                       "30d": (30, "day")}
OUTCOMES = ("sent", "deferred", "failed")


@dataclass
class Bucket:
    start: float
    end: float
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Filters:
    status: str | None = None
    sender: str | None = None
    recipient: str | None = None
    since: float | None = None  # created at or after
    until: float | None = None  # created before


def _local_midnight(when: dt.datetime) -> dt.datetime:
    return when.replace(hour=0, minute=0, second=0, microsecond=0)


def buckets(period: str, now: float) -> list[Bucket]:
    """Hour buckets ending with the current hour, or local days ending with today."""
    n, size = PERIODS.get(period, PERIODS["24h"])
    if size == "hour":
        top = (int(now) // HOUR + 1) * HOUR
        return [Bucket(top - (n - i) * HOUR, top - (n - i - 1) * HOUR) for i in range(n)]
    today = _local_midnight(dt.datetime.fromtimestamp(now).astimezone())
    days = [today - dt.timedelta(days=n - 1 - i) for i in range(n + 1)]
    # Local midnights, recomputed through the time zone so a change of time is honoured.
    edges = [_local_midnight(d.replace(tzinfo=None)).astimezone().timestamp() for d in days]
    return [Bucket(edges[i], edges[i + 1]) for i in range(n)]


async def activity(store: Store, establishment_id: int, period: str, now: float) -> list[Bucket]:
    """Delivery attempts of the establishment per bucket, by outcome (sent, deferred,
    failed): counted per hour in SQL, then gathered into the buckets."""
    out = buckets(period, now)
    if not out:
        return out
    start = out[0].start
    for h, outcome, n in await store.activity_by_hour(establishment_id, start, OUTCOMES):
        moment = start + h * HOUR + 1
        for b in out:
            if b.start <= moment < b.end:
                b.counts[outcome] += n
                break
    return out


async def search(
    store: Store, establishment_id: int, filters: Filters, limit: int = 200
) -> list[Row]:
    """The establishment's messages matching ``filters``, newest first."""
    return await store.search_messages(
        establishment_id, status=filters.status, sender=filters.sender,
        recipient=filters.recipient, since=filters.since, until=filters.until, limit=limit)
