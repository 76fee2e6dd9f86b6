"""The storage interface every backend implements: :class:`Store`, the sum of one
protocol per concept (accounts, configuration, queue, relays, alerts, reports, bounces),
and the records it returns (:mod:`postier.store.records`, named here too).

The service layer and the delivery engine only see this interface; SQL stays in the
backends (:mod:`postier.store.sql` and the ``sql_*`` modules it is made of).
"""

from __future__ import annotations

from typing import Protocol

from postier.store.accounts import AccountStore
from postier.store.alerts import AlertStore
from postier.store.bounces import BounceStore
from postier.store.configuration import ConfigurationStore
from postier.store.queue import QueueStore
from postier.store.records import (
    BOUNCED,
    CANCELLED,
    DEFERRED,
    FAILED,
    FAILURES_KEPT,
    FINAL_STATUSES,
    PENDING,
    PRIORITIES,
    QUEUED,
    ROLES,
    SENDING,
    SENT,
    SIGN_IN_DOORS,
    STATUSES,
    SUPPRESSED,
    WAITER_STALE,
    AttemptRecord,
    AuditEntry,
    Claimed,
    EnqueueResult,
    Establishment,
    MessageRecord,
    NewMessage,
    Outcome,
    PaceAsk,
    PaceGrant,
    ProfileRecord,
    RecipientState,
    RelayGrant,
    RelayHealth,
    RelayLimits,
    RelayPause,
    Role,
    SenderAddress,
    TokenInfo,
    User,
    account_key,
    address_key,
    name_key,
    source_key,
)
from postier.store.relays import RelayStore
from postier.store.reports import ReportStore

__all__ = [
    "BOUNCED",
    "CANCELLED",
    "DEFERRED",
    "FAILED",
    "FAILURES_KEPT",
    "FINAL_STATUSES",
    "PENDING",
    "PRIORITIES",
    "QUEUED",
    "ROLES",
    "SENDING",
    "SENT",
    "SIGN_IN_DOORS",
    "STATUSES",
    "SUPPRESSED",
    "WAITER_STALE",
    "AttemptRecord",
    "AuditEntry",
    "Claimed",
    "EnqueueResult",
    "Establishment",
    "MessageRecord",
    "NewMessage",
    "Outcome",
    "PaceAsk",
    "PaceGrant",
    "ProfileRecord",
    "RecipientState",
    "RelayGrant",
    "RelayHealth",
    "RelayLimits",
    "RelayPause",
    "Role",
    "SenderAddress",
    "Store",
    "TokenInfo",
    "User",
    "account_key",
    "address_key",
    "name_key",
    "source_key",
]


class Store(AccountStore, ConfigurationStore, QueueStore, RelayStore, AlertStore, ReportStore,
            BounceStore, Protocol):
    """Durable storage of accounts, settings, the queue, the relays' shared state, alerts
    what the reports read, and the suppression list."""

    # Whether the store is a file of this machine's (SQLite), that one process at a time
    # may deliver from, rather than a database server shared by several machines.
    embedded: bool = False
    # The backend's name, for the logs.
    backend: str = "sql"

    async def open(self) -> None:
        """Connect and bring the schema up to date."""

    async def close(self) -> None: ...
