"""The relays part of the store: each relay's sending limits, pause, failing state and
connection slots, shared by every worker of every process."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from postier.store.records import RelayGrant, RelayHealth, RelayLimits, RelayPause


class RelayStore(Protocol):
    """What every worker must agree on about a relay."""

    # -- sending limits and pauses ---------------------------------------------------------
    async def reserve_relay(
        self, relay_key: str, limits: RelayLimits, recipients: Sequence[int], now: float,
        horizon: float,
    ) -> RelayGrant:
        """Reserve, atomically for every process, one start per e-mail of ``recipients``
        (each item its number of recipients), in order: none past the relay's pause, its
        per-hour and recipients-per-day windows, and no start later than ``now + horizon``
        in its per-minute pace. What is granted is counted at once."""

    async def relay_pause(self, relay_key: str) -> RelayPause | None:
        """The relay's shared pause state (None: it never asked to slow down)."""

    async def pause_relay(
        self, relay_key: str, now: float, pause: float, max_pause: float, error: str
    ) -> RelayPause:
        """The relay asked to slow down: unless already paused, pause it for its current
        pause length (``pause`` the first time), and double the next one up to
        ``max_pause``."""

    async def relay_recovered(self, relay_key: str) -> None:
        """An e-mail went through: the next pause starts short again."""

    # -- failing state (failover, alerts) --------------------------------------------------
    async def relay_health(self, relay_key: str, now: float, waiters_of: str | None = None,
                           holder: str = "") -> RelayHealth:
        """The relay's shared failing state; with ``waiters_of`` (the key its connection
        slots go by), also the establishments holders other than ``holder`` have been
        waiting for one of its slots for (seen within ``WAITER_STALE`` seconds of
        ``now``)."""

    async def relay_failing(self, relay_key: str, now: float) -> float:
        """A worker saw the relay fail: unless already failing, it fails since ``now``;
        returns since when it fails."""

    async def relay_answered(self, relay_key: str, now: float) -> bool:
        """A worker (or a probe) found the relay answering: it no longer fails, for every
        worker. True when it was failing."""

    async def claim_relay_probe(self, relay_key: str, now: float, every: float) -> bool:
        """Whether this worker is the one to probe the relay now (no worker did within
        ``every`` seconds); noted when so."""

    # -- connection slots (max_connections) ------------------------------------------------
    async def take_relay_slot(
        self, relay_key: str, max_connections: int, holder: str, now: float,
        lease_seconds: float, establishment_id: int = 0, *, queue: bool = False,
    ) -> int | None:
        """Take, atomically for every process, one of the relay's ``max_connections``
        connection slots for ``holder`` until ``now + lease_seconds``: a free one, or one
        whose lease expired (its holder died). None when every slot is held.

        With ``queue``, the slot is for an e-mail of ``establishment_id``, and free
        slots go first to the waiters (``relay_waiters``) whose establishment holds
        fewest slots, then to the longest waiting: without a slot for it, the holder is
        noted (or kept) as waiting for that establishment."""

    async def renew_relay_slots(
        self, holder: str, slots: Collection[tuple[str, int]], now: float,
        lease_seconds: float,
    ) -> set[tuple[str, int]]:
        """Extend ``holder``'s leases on ``slots`` (relay key, slot number); returns those
        it still held (the others were taken over after expiring)."""

    async def release_relay_slot(self, relay_key: str, slot: int, holder: str,
                                 handed_round: float | None = None) -> None:
        """The connection closed: the slot is free for any worker (unless another holder
        took it over meanwhile). ``handed_round`` (the time): given up for the other
        waiters, so ``holder``'s own waits go to the back of the line."""
