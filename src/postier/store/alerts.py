"""The alerts part of the store: incidents and the webhook outbox (see
:mod:`postier.ops.alerts`; the SQL is in :mod:`postier.store.sql_alerts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

# The statuses of an event of the webhook outbox.
PENDING, DELIVERED, GAVE_UP = "pending", "delivered", "gave_up"


@dataclass(frozen=True)
class Incident:
    id: int
    establishment_id: int
    kind: str
    started_at: float
    resolved_at: float | None
    details: dict[str, Any]

    @property
    def open(self) -> bool:
        return self.resolved_at is None


@dataclass(frozen=True)
class OutgoingEvent:
    id: int
    establishment_id: int
    event_id: str
    event: str
    payload: str
    attempts: int
    created_at: float


class AlertStore(Protocol):
    """Incidents, opened and closed once however many processes check them, and the
    events waiting to be posted to an establishment's webhook."""

    async def open_incident(self, establishment_id: int, kind: str, started_at: float,
                            details: dict[str, Any]) -> Incident | None:
        """Open an incident; ``None`` when one of that kind is already open (somebody else
        raised it)."""

    async def resolve_incident(self, incident_id: int, at: float) -> bool:
        """Close an open incident; ``False`` when somebody else already did."""

    async def open_incidents(self, establishment_id: int | None = None) -> list[Incident]:
        """The incidents open now (of every establishment when ``None``), oldest first."""

    async def list_incidents(self, establishment_id: int, limit: int = 100
                             ) -> list[Incident]:
        """The establishment's incidents, open ones first, then the most recent."""

    async def last_resolved(self, establishment_id: int, kind: str) -> float | None:
        """When the latest incident of this kind ended."""

    async def oldest_waiting(self) -> dict[int, tuple[float, int]]:
        """Per establishment: when its oldest e-mail still waiting was accepted, and how many
        wait (``queued``, ``sending`` or ``deferred``)."""

    # -- the webhook outbox --------------------------------------------------------------
    async def add_event(self, establishment_id: int, event_id: str, event: str,
                        dedupe_key: str, payload: str, now: float) -> bool:
        """Store an event to post; ``False`` when an event with this key is already stored."""

    async def take_due_events(self, now: float, hold: float, limit: int = 20
                              ) -> list[OutgoingEvent]:
        """Due events, each taken for ``hold`` seconds by this process (another process skips
        them meanwhile; if this one dies, they are due again after ``hold``)."""

    async def event_done(self, row_id: int, *, delivered: bool, attempts: int,
                         next_at: float | None, error: str | None) -> None:
        """Record one posting: delivered, to be tried again at ``next_at``, or given up."""

    async def list_events(self, establishment_id: int, limit: int = 100
                          ) -> list[dict[str, Any]]:
        """The establishment's events, newest first, as stored."""
