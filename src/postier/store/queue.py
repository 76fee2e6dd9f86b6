"""The queue part of the store: acceptance, claims under a lease, delivery results,
reading and administering e-mails, and the submission pace shared by every process."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from postier.store.records import (
    Claimed,
    EnqueueResult,
    MessageRecord,
    NewMessage,
    Outcome,
    PaceAsk,
    PaceGrant,
)


class QueueStore(Protocol):
    """The e-mails, from acceptance to their final status."""

    # -- acceptance ------------------------------------------------------------------------
    async def enqueue(self, batch: Sequence[NewMessage]) -> list[EnqueueResult]:
        """Store all messages durably in one commit, or none; return after the commit.

        A message whose (user, idempotency key) is already stored is not stored again: its
        result names the first message with ``duplicate=True``.
        """

    # -- delivery --------------------------------------------------------------------------
    async def claim(
        self, worker_id: str, limit: int, lease_seconds: float, now: float,
        skip_establishments: Collection[int] = (),
    ) -> list[Claimed]:
        """Take up to ``limit`` due messages under a lease: each establishment's in turn
        (round-robin, every establishment's first, then every one's second...), most
        urgent first within an establishment, so that one establishment's flood holds
        back no other's e-mail; leaving those of ``skip_establishments`` (whose relay
        already has as many of this worker's deliveries in flight as it may usefully
        hold) to later claims."""

    async def renew_leases(
        self, worker_id: str, ids: Sequence[str], lease_seconds: float, now: float
    ) -> set[str]:
        """Extend the worker's leases; returns the ids it still held (the others were
        taken back after the lease expired)."""

    async def release_expired_leases(self, now: float, *, everything: bool = False) -> int:
        """Return messages whose lease expired (a crashed worker's) to the queue, due now.

        ``everything`` releases every lease: only for a process that knows it is the sole
        worker of the store (the embedded store's server, holding the data-dir lock).
        """

    async def release_worker(self, worker_id: str) -> int:
        """Return a stopping worker's claimed messages to the queue."""

    async def record_outcomes(self, worker_id: str, outcomes: Sequence[Outcome]) -> None: ...

    # -- reading and administration --------------------------------------------------------
    async def get_message(self, message_id: str) -> MessageRecord | None: ...

    async def list_messages(
        self,
        *,
        establishment_id: int,
        user_id: int | None = None,
        status: str | None = None,
        limit: int = 100,
    ) -> list[MessageRecord]: ...

    async def set_status(
        self, message_id: str, status: str, *, from_statuses: Sequence[str], now: float,
        next_attempt_at: float | None = None,
    ) -> bool:
        """Change a message's status if it is in one of ``from_statuses``."""

    async def has_body(self, message_id: str) -> bool:
        """Whether the message's content is still kept (retention removes it)."""

    async def retry_now(self, message_id: str, now: float) -> bool:
        """Make a waiting or failed message due now; failed recipients are tried again."""

    async def retry_matching(
        self, *, establishment_id: int, user_id: int | None, statuses: Sequence[str],
        now: float, sender: str | None = None, recipient: str | None = None,
        since: float | None = None, until: float | None = None,
    ) -> int:
        """:meth:`retry_now` for every message of the establishment (of ``user_id`` only,
        unless ``None``) in one of ``statuses`` (waiting or failed ones) whose content is
        still kept, in one transaction; how many were made due. ``sender`` and
        ``recipient`` are parts of an address (any case), ``since`` and ``until`` bound
        the creation time, as the queue page's filters."""

    async def get_content(self, message_id: str) -> tuple[bytes, bool] | None:
        """The message's stored bytes and whether it needs SMTPUTF8, or ``None`` once
        retention removed them."""

    async def counts(self, establishment_id: int | None = None) -> dict[str, int]: ...

    # -- the submission pace, shared by every process (postier.core.pace) ------------------
    async def reserve_pace(self, asks: Sequence[PaceAsk]) -> PaceGrant:
        """In one transaction, atomically for every process: if every ask's ``need`` fits
        under its ``limit`` in its counter, count for each ``min(want, what is left)``
        (at least ``need``); else count nothing and say which ask did not fit. A counter's
        older buckets are deleted."""
