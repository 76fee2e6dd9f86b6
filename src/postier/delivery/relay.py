"""The names the relay code had before it was split by concept, for the callers that still
import them from here. New code imports them from where they are defined:

- :mod:`postier.delivery.pool`: :class:`RelayPool`, the connections per relay;
- :mod:`postier.delivery.connection`: :func:`open_smtp`, :func:`open_session`;
- :mod:`postier.delivery.transaction`: :func:`send_on`, :class:`TransactionResult`;
- :mod:`postier.delivery.classify`: :func:`classify`, the failure codes;
- :mod:`postier.delivery.slots`: :class:`PrioritySlots`;
- :mod:`postier.delivery.tls`: :func:`tls_context`.
"""

from __future__ import annotations

from postier.core.settings import RelaySettings
from postier.delivery.classify import classify
from postier.delivery.connection import open_session, open_smtp
from postier.delivery.pool import RelayPool
from postier.delivery.slots import PrioritySlots
from postier.delivery.tls import tls_context
from postier.delivery.transaction import RcptResult, TransactionResult, send_on

__all__ = [
    "PrioritySlots",
    "RcptResult",
    "RelayPool",
    "TransactionResult",
    "classify",
    "open_session",
    "open_smtp",
    "relay_label",
    "send_on",
    "tls_context",
]


def relay_label(relay: RelaySettings) -> str:
    return relay.describe()
