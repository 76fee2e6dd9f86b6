"""The SQL store (SQLAlchemy 2 Core, async), shared by SQLite and PostgreSQL.

:class:`SQLStore` is made of one part per concept, each over the same engines and the same
group-commit writer (:mod:`postier.store.sql_base`): accounts, configuration, the queue's
hot paths and its reading, the relays' shared state, alerts, reports, retention, and
bounces with the suppression list. The
backends (:mod:`postier.store.sqlite`, :mod:`postier.store.postgres`) give it its engines
and replace the statements they can do in fewer round trips.
"""

from __future__ import annotations

from postier.store.base import Store
from postier.store.sql_accounts import SQLAccounts
from postier.store.sql_alerts import SQLAlerts
from postier.store.sql_base import (
    WriteJob,
    _driver_sql,
    _translate,
    database_unreachable,
    unreachable,
)
from postier.store.sql_bounces import SQLBounces
from postier.store.sql_configuration import SQLConfiguration
from postier.store.sql_messages import SQLMessages
from postier.store.sql_queue import CLAIM_WALK_MIN, ClaimAsk, SQLQueue, fair_order
from postier.store.sql_relays import SQLRelays
from postier.store.sql_reports import SQLReports
from postier.store.sql_retention import SQLRetention

__all__ = [
    "CLAIM_WALK_MIN",
    "ClaimAsk",
    "SQLStore",
    "WriteJob",
    "_driver_sql",
    "_translate",
    "database_unreachable",
    "fair_order",
    "unreachable",
]


class SQLStore(SQLAccounts, SQLConfiguration, SQLQueue, SQLMessages, SQLRelays, SQLAlerts,
               SQLReports, SQLRetention, SQLBounces, Store):
    """Common SQL implementation; backends provide the engines and the claim statement."""
