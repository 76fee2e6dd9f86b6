"""The submission pace: how many recipients an account and an establishment may queue per
clock minute and per UTC day, through the HTTP API and SMTP submission alike.

Recipients are counted, not e-mails: one e-mail to 1,000 addresses costs the relay, its
quotas (Microsoft 365 and Google count recipients a day) and the establishment's
reputation as much as 1,000 e-mails. A submission is admitted whole or not at all: when
any of its four counters (account and establishment, minute and day) cannot take all its
recipients, nothing is queued and the caller is told when to try again (429); one larger
than a limit can never pass and is refused as such (422: send it in parts).

The counters live in the store (``api_usage``), shared by every process of the
installation (``--http-processes``, several servers on one PostgreSQL). A process does not
write there for each request: it reserves a share of each counter at once (1/20 of the
limit, at most 1,000 recipients) and spends it locally, going back to the store when it is
spent. The store never counts more than a limit, so no window ever lets more than its
limit through; what another process reserved and has not spent yet is unavailable to the
others until the window ends, so a request may be refused up to (processes - 1) x 1.5
shares early (75 recipients for the default minute limit of an account, per extra
process). The next share is reserved ahead, in the background, once half of the one held
is spent, so that a busy account's requests do not all wait for the store's commit at
the moment its share runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from postier.errors import InvalidInput, PostierError
from postier.i18n import N_
from postier.server.config import ServerConfig
from postier.store.base import PaceAsk, Store, User

SPANS = (("m", 60), ("d", 86400))
SHARE = 20  # a process reserves 1/SHARE of a limit at a time...
MAX_SHARE = 1000  # ...and at most this many recipients
_KEEP = 10_000  # local counters kept before the stale ones are dropped

# What each counter is, for the person told about it ({reason} is translated).
_REASONS = {
    ("a", "m"): N_("your account's limit per minute"),
    ("a", "d"): N_("your account's limit per day"),
    ("e", "m"): N_("your establishment's limit per minute"),
    ("e", "d"): N_("your establishment's limit per day"),
}
_SETTINGS = {
    ("a", "m"): "POSTIER_PACE_ACCOUNT_PER_MINUTE",
    ("a", "d"): "POSTIER_PACE_ACCOUNT_PER_DAY",
    ("e", "m"): "POSTIER_PACE_ESTABLISHMENT_PER_MINUTE",
    ("e", "d"): "POSTIER_PACE_ESTABLISHMENT_PER_DAY",
}
_HINT = N_(
    "Send large mailings in parts spread over time. The server's operator may raise the "
    "limit ({setting})."
)


class PaceExceeded(PostierError):
    """A counter is full for now: nothing was queued; ``retry_after`` seconds from now it
    starts again from zero."""

    code = "submission_limit"
    http_status = 429
    transient = True
    default_template = N_(
        "Sending limit reached: {reason} is {limit} recipients. Nothing of this submission "
        "({count} recipients) was accepted; try again in {wait} seconds."
    )

    def __init__(self, template: str | None = None, *, retry_after: int,
                 **params: Any) -> None:
        self.retry_after = retry_after
        super().__init__(template, hint=_HINT, wait=retry_after, **params)


_DAY_FULL = N_(
    "Sending limit reached: {reason} is {limit} recipients. Nothing of this submission "
    "({count} recipients) was accepted; try again after midnight UTC (in {wait} seconds)."
)


class PaceTooLarge(InvalidInput):
    """A submission with more recipients than a limit: it can never pass whole."""

    code = "submission_too_large"
    default_template = N_(
        "This submission has {count} recipients, more than {reason} ({limit}): it can "
        "never be accepted whole. Send it in parts of at most {limit} recipients."
    )


@dataclass(frozen=True)
class PaceLimits:
    """Recipients per account and per establishment, per minute and per day (0: none)."""

    account_per_minute: int
    account_per_day: int
    establishment_per_minute: int
    establishment_per_day: int

    @classmethod
    def from_config(cls, config: ServerConfig) -> PaceLimits:
        return cls(config.pace_account_per_minute, config.pace_account_per_day,
                   config.pace_establishment_per_minute, config.pace_establishment_per_day)


class _Counter(NamedTuple):  # a tuple: built four times for every submission
    kind: str  # "a" account, "e" establishment
    scope: str
    span: str
    bucket: int
    limit: int
    ends: float  # when the bucket ends


class Pace:
    """One process's view of the shared counters (see the module's docstring)."""

    def __init__(self, store: Store, limits: PaceLimits,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.limits = limits
        self.clock = clock
        # (scope, span) -> (bucket, recipients this process reserved and has not spent)
        self._left: dict[tuple[str, str], tuple[int, int]] = {}
        # One reservation at a time per account, so that a burst of its requests asks the
        # store once; different accounts ask together (the store's writer commits their
        # reservations in one transaction).
        self._asking: dict[int, asyncio.Lock] = {}
        self._refills: set[asyncio.Task[None]] = set()  # reservations made ahead, running

    def _counters(self, user: User, now: float) -> list[_Counter]:
        lim = self.limits
        out = []
        for kind, scope, per_minute, per_day in (
            ("a", f"a:{user.id}", lim.account_per_minute, lim.account_per_day),
            ("e", f"e:{user.establishment_id}", lim.establishment_per_minute,
             lim.establishment_per_day),
        ):
            for (span, seconds), limit in zip(SPANS, (per_minute, per_day), strict=True):
                if limit:
                    bucket = int(now // seconds)
                    out.append(_Counter(kind, scope, span, bucket, limit,
                                        (bucket + 1) * seconds))
        return out

    async def take(self, user: User, count: int) -> None:
        """Count ``count`` recipients for ``user``, or raise :class:`PaceExceeded` /
        :class:`PaceTooLarge` having counted nothing."""
        counters = self._counters(user, self.clock())
        for c in counters:
            if count > c.limit:
                raise PaceTooLarge(count=count, limit=c.limit,
                                   reason=_REASONS[(c.kind, c.span)])
        if self._spend(counters, count):
            self._refill_ahead(user.id, counters)
            return
        async with self._lock(user.id):
            if not self._spend(counters, count):
                await self._reserve(counters, count)

    def _refill_ahead(self, account: int, counters: list[_Counter]) -> None:
        """Once what this process holds of a counter falls under half a share, reserve the
        next share in the background: the account's requests go on spending meanwhile
        instead of all waiting for the store's commit at the moment it runs out."""
        low = [c for c in counters if self._held(c) < self._share(c) // 2]
        if not low or self._lock(account).locked():
            return
        task = asyncio.get_running_loop().create_task(self._refill(account, low))
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

    async def _refill(self, account: int, counters: list[_Counter]) -> None:
        async with self._lock(account):
            low = [c for c in counters if self._held(c) < self._share(c) // 2]
            if not low:
                return
            asks = [PaceAsk(c.scope, c.span, c.bucket, 1, self._share(c), c.limit)
                    for c in low]
            with contextlib.suppress(Exception):  # the next take asks again, and says why
                grant = await self.store.reserve_pace(asks)
                if grant.refused is None:
                    self._credit(low, grant.granted)

    def _credit(self, counters: list[_Counter], granted: list[int]) -> None:
        """Add what the store granted to what this process holds of each counter."""
        for c, n in zip(counters, granted, strict=True):
            self._left[(c.scope, c.span)] = (c.bucket, self._held(c) + n)

    @staticmethod
    def _share(c: _Counter) -> int:
        return max(1, min(c.limit // SHARE, MAX_SHARE))

    def _lock(self, account: int) -> asyncio.Lock:
        lock = self._asking.get(account)
        if lock is None:
            if len(self._asking) > _KEEP:
                self._asking = {k: v for k, v in self._asking.items() if v.locked()}
            lock = self._asking[account] = asyncio.Lock()
        return lock

    def give_back(self, user: User, count: int) -> None:
        """``count`` recipients taken were not queued after all (a refused submission, a
        duplicate): this process may spend them again in the same window."""
        for c in self._counters(user, self.clock()):
            held = self._left.get((c.scope, c.span))
            if held is not None and held[0] == c.bucket:  # else its window has ended
                self._left[(c.scope, c.span)] = (c.bucket, held[1] + count)

    def _spend(self, counters: list[_Counter], count: int) -> bool:
        """Spend from what this process holds, if it holds enough on every counter."""
        left = self._left
        for c in counters:
            held = left.get((c.scope, c.span))
            if held is None or held[0] != c.bucket or held[1] < count:
                return False
        for c in counters:
            key = (c.scope, c.span)
            left[key] = (c.bucket, left[key][1] - count)
        return True

    def _held(self, c: _Counter) -> int:
        bucket, left = self._left.get((c.scope, c.span), (c.bucket, 0))
        return left if bucket == c.bucket else 0

    async def _reserve(self, counters: list[_Counter], count: int) -> None:
        asks, mine = [], []
        for c in counters:
            need = max(0, count - self._held(c))
            if need:
                asks.append(PaceAsk(c.scope, c.span, c.bucket, need,
                                    max(need, self._share(c)), c.limit))
                mine.append(c)
        grant = await self.store.reserve_pace(asks)
        if grant.refused is not None:
            c = mine[grant.refused]
            raise PaceExceeded(
                _DAY_FULL if c.span == "d" else None,
                retry_after=max(1, int(c.ends - self.clock()) + 1),
                reason=_REASONS[(c.kind, c.span)], limit=c.limit, count=count,
                setting=_SETTINGS[(c.kind, c.span)])
        if len(self._left) > _KEEP:
            now = self.clock()
            current = {int(now // seconds) for _, seconds in SPANS}
            self._left = {k: v for k, v in self._left.items() if v[0] in current}
        self._credit(mine, grant.granted)
        if not self._spend(counters, count):  # pragma: no cover - granted covers count
            raise AssertionError("a pace reservation did not cover its request")


_PACES: weakref.WeakKeyDictionary[object, Pace] = weakref.WeakKeyDictionary()


def pace_for(store: Store, config: ServerConfig) -> Pace:
    """The process's one :class:`Pace` over ``store``, shared by its doors (the HTTP API
    and SMTP submission), so that they hold one reservation between them."""
    pace = _PACES.get(store)
    if pace is None:
        pace = _PACES[store] = Pace(store, PaceLimits.from_config(config))
    return pace
