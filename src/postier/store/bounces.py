"""The bounces part of the store: the suppression list and the bounces received (see
:mod:`postier.core.bounces`; the SQL is in :mod:`postier.store.sql_bounces`)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

# Why an address is on the suppression list.
SUPPRESSION_REASONS = ("bounce", "complaint", "repeated", "manual")
# What a received report says about a recipient.
HARD, SOFT, COMPLAINT = "hard", "soft", "complaint"


@dataclass(frozen=True)
class Suppression:
    establishment_id: int
    address: str
    reason: str
    code: int | None
    status: str
    diagnostic: str
    message_id: str | None
    created_at: float
    created_by: str

    @property
    def key(self) -> str:
        return self.address.lower()


@dataclass(frozen=True)
class BounceRecord:
    establishment_id: int
    message_id: str
    address: str
    kind: str
    status: str
    code: int | None
    diagnostic: str
    received_at: float


class BounceStore(Protocol):
    """The addresses each establishment no longer sends to, and the bounces received."""

    async def suppressed_keys(self, establishment_id: int) -> frozenset[str]:
        """The lower-cased addresses on the establishment's suppression list."""

    async def suppressions_of(self, establishment_id: int, keys: Collection[str]
                              ) -> list[Suppression]:
        """The entries of these lower-cased addresses."""

    async def list_suppressions(self, establishment_id: int, *, search: str = "",
                                limit: int = 100, offset: int = 0
                                ) -> tuple[list[Suppression], int]:
        """One page of the list, newest first, and how many entries match ``search``."""

    async def add_suppression(self, entry: Suppression) -> bool:
        """Put an address on the list; ``False`` when it already is (left as it was)."""

    async def remove_suppression(self, establishment_id: int, key: str
                                 ) -> Suppression | None:
        """Lift an address; the entry removed, or ``None`` when it was not listed."""

    async def record_bounce(self, bounce: BounceRecord) -> None:
        """Keep a received bounce (purged with its e-mail)."""

    async def mark_bounced(self, bounce: BounceRecord) -> bool:
        """The e-mail's recipient of that address becomes ``bounced`` (code, diagnostic,
        time) if it was ``sent``; whether it did."""

    async def soft_bounce_days(self, establishment_id: int, key: str, since: float) -> int:
        """On how many different days (UTC) temporary failures of this address arrived
        since ``since``."""

    async def bounce_tallies(self) -> tuple[dict[tuple[int, str], int], dict[int, int]]:
        """For the metrics: bounces on record per (establishment, kind), and addresses on
        each establishment's suppression list."""
