"""The bounce SMTP door (``postier serve --bounce-smtp HOST:PORT``): where bounces come
back, forwarded by the school's mail server or sent straight by the world when the bounce
domain's MX points here.

It takes mail only for valid return addresses (``bounces+<id>-<mac>@…``: a keyed digest
of an e-mail still on record), so it relays nothing and a made-up address is refused at
RCPT. A report is applied before ``250`` is answered (:func:`postier.ops.bounces.receive`);
the store away gets ``451`` so the sending server tries again later; anything else a
hostile or broken report could cause is logged and answered ``250``: it is never tried
again and never crashes the door. Connections are capped like the submission door's.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from typing import Any, ClassVar

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from postier.core.service import Postier
from postier.errors import StoreUnavailable
from postier.ops.bounces import MAX_BOUNCE_SIZE, receive
from postier.server.smtp import CappedSMTP

log = logging.getLogger("postier.smtp.bounces")

MAX_RECIPIENTS = 10  # a bounce is for one return address; a few when an MTA groups them
MAX_CONNECTIONS = 100
COMMAND_TIMEOUT = 60.0
DATA_TIMEOUT = 600.0


class BounceHandler:
    """The door's SMTP commands."""

    def __init__(self, core: Postier) -> None:
        self.core = core

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            return "454 4.7.0 TLS negotiation failed"
        if isinstance(error, StoreUnavailable):
            log.warning("bounce door: %s", error)
        else:
            log.error("bounce door command failed", exc_info=error)
        return "451 4.3.0 Temporary failure; try again later"

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        # Bounces come from the null sender; forwarders keep the original one.
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return f"452 4.5.3 Too many recipients: at most {MAX_RECIPIENTS} per message"
        if await self.core.bounces.accepts(address) is None:
            return f"550 5.1.1 <{address[:200]}>: no such return address here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        try:
            result = await receive(self.core, raw, envelope.rcpt_tos)
        except StoreUnavailable as exc:
            log.warning("bounce not applied, the sender will try again: %s", exc)
            return "451 4.3.0 Temporary failure; try again later"
        except Exception:
            log.exception("bounce could not be applied; it is dropped")
            return "250 2.0.0 Received"
        return f"250 2.0.0 Received ({result.kind})"


class _BounceDoor(CappedSMTP):
    """The bounce door's protocol, with connection counters of its own."""

    active = 0
    per_client: ClassVar[collections.Counter[str]] = collections.Counter()


async def start_bounce_door(core: Postier, *, host: str, port: int,
                            tls: ssl.SSLContext | None) -> asyncio.Server:
    """Listen for bounces on ``host:port`` (STARTTLS offered when ``tls`` is given)."""
    handler = BounceHandler(core)

    def protocol() -> Any:
        return _BounceDoor(
            handler,
            max_connections=MAX_CONNECTIONS,
            max_per_client=MAX_CONNECTIONS // 4,
            data_timeout=DATA_TIMEOUT,
            hostname=core.config.hostname,
            data_size_limit=MAX_BOUNCE_SIZE,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=tls,
            require_starttls=False,
            auth_required=False,
            timeout=COMMAND_TIMEOUT,
        )

    return await asyncio.get_running_loop().create_server(protocol, host, port)
