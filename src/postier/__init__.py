"""Postier: outgoing e-mail for school software.

The package's face is the Python SDK, for an application or a workstation that sends:

>>> import postier
>>> with postier.Client("http://serveur-edt:8025", token) as client:
...     client.submit(to=["parent@example.org"], subject="Bonjour", text="…")
>>> postier.send(["parent@example.org"], "Bonjour", "…")  # the workstation's settings

Importing it loads no server code (:mod:`postier.workstation.sending` says how).
"""

from postier.errors import (
    AuthenticationRequired,
    Conflict,
    DelegationOff,
    DeliveryError,
    Forbidden,
    InvalidAddress,
    InvalidDomainPattern,
    InvalidInput,
    InvalidSetting,
    NotFound,
    PostierError,
    SenderForbidden,
    SenderNotConfigured,
    StoreUnavailable,
    TooLarge,
)
from postier.workstation.client import (
    Client,
    MessageStatus,
    Recipient,
    SendResult,
    ServerUnreachable,
    Submission,
)
from postier.workstation.sending import OutboxFlusher, flush_outbox, pull_profile, send

__version__ = "0.1.0"

__all__ = [
    "AuthenticationRequired",
    "Client",
    "Conflict",
    "DelegationOff",
    "DeliveryError",
    "Forbidden",
    "InvalidAddress",
    "InvalidDomainPattern",
    "InvalidInput",
    "InvalidSetting",
    "MessageStatus",
    "NotFound",
    "OutboxFlusher",
    "PostierError",
    "Recipient",
    "SendResult",
    "SenderForbidden",
    "SenderNotConfigured",
    "ServerUnreachable",
    "StoreUnavailable",
    "Submission",
    "TooLarge",
    "__version__",
    "flush_outbox",
    "pull_profile",
    "send",
]
