"""The signed webhook for integrators: events stored in an outbox, posted in the background.

Events (``alert.raised``, ``alert.resolved`` from :mod:`postier.ops.alerts`, and for
integrators ``message.failed``, ``message.delayed``, ``message.sent``) are first stored in
the ``webhook_outbox`` table, so none is lost across restarts and delivery never waits for
them; :class:`postier.ops.alerts.AlertTask` has :class:`WebhookSender` post them from the
background of the delivery process, JSON signed with HMAC-SHA256
(``X-Postier-Signature: sha256=<hex>`` over ``<X-Postier-Timestamp>.<body>``), with bounded
timeouts, TLS verified, no redirects followed, and retries with exponential backoff for
three days.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from postier import __version__
from postier.core.notices import NOTICE_PREFIX
from postier.core.queue_entry import SYSTEM_USER
from postier.core.reasons import explain_error
from postier.core.settings import DeliverySettings, RelaySettings, WebhookEvent
from postier.delivery.tls import tls_context
from postier.store.alerts import OutgoingEvent
from postier.store.base import BOUNCED

if TYPE_CHECKING:
    from postier.core.service import Postier

log = logging.getLogger("postier.ops.webhook")

POST_TIMEOUT = 10.0  # seconds, for the whole webhook request
HOLD = 60.0  # seconds a process keeps an event it is posting from the others
GIVE_UP_AFTER = 3 * 86400.0
SIGNATURE_HEADER = "X-Postier-Signature"
TIMESTAMP_HEADER = "X-Postier-Timestamp"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


async def queue_event(core: Postier, establishment_id: int, settings: DeliverySettings,
                      category: WebhookEvent, event: str, dedupe_key: str,
                      data: dict[str, Any], now: float | None = None) -> bool:
    """Store one webhook event for the establishment, if its webhook takes this category;
    once per ``dedupe_key``. ``True`` when stored now."""
    alerts = settings.alerts
    if not alerts.webhook_url or category not in alerts.webhook_events:
        return False
    est = await core.establishment(establishment_id)
    now = time.time() if now is None else now
    event_id = secrets.token_hex(16)
    body = json.dumps({
        "id": event_id, "type": event, "created_at": _iso(now),
        "establishment": est.slug if est else str(establishment_id), "data": data,
    }, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return await core.store.add_event(establishment_id, event_id, event, dedupe_key, body,
                                      now)


# -- events about e-mails, for integrators -------------------------------------------------


def _wanted(settings: DeliverySettings, category: WebhookEvent) -> bool:
    return bool(settings.alerts.webhook_url) and category in settings.alerts.webhook_events


async def message_event(core: Postier, message_id: str, kind: str,
                        establishment_id: int | None = None) -> bool:
    """Store ``message.failed``, ``message.delayed``, ``message.sent`` or
    ``message.bounced`` for an e-mail, when the establishment's webhook takes it. Each is
    stored once per state: ``failed`` (``bounced``) again only when more recipients have
    failed (bounced), ``delayed`` once per e-mail. Knowing
    ``establishment_id`` spares reading the e-mail when nobody wants the event."""
    category = {"failed": WebhookEvent.FAILURES, "delayed": WebhookEvent.DELAYS,
                "sent": WebhookEvent.SENT, "bounced": WebhookEvent.BOUNCES}[kind]
    if establishment_id is not None and not _wanted(
            await core.delivery_settings(establishment_id), category):
        return False
    record = await core.store.get_message(message_id)
    if record is None or record.user_id == SYSTEM_USER or (
            record.idempotency_key or "").startswith(NOTICE_PREFIX):
        return False  # Postier's own e-mails (notices, alerts) are no integrator's business
    settings = await core.delivery_settings(record.establishment_id)
    if not _wanted(settings, category):
        return False
    failed = [r for r in record.recipients if r.status == "failed"]
    bounced = [r for r in record.recipients if r.status == BOUNCED]
    key = {"failed": f"failed:{record.id}:{len(failed)}", "delayed": f"delayed:{record.id}",
           "sent": f"sent:{record.id}", "bounced": f"bounced:{record.id}:{len(bounced)}"}[kind]
    user = await core.store.get_user(user_id=record.user_id)
    data = {
        "message": {
            "id": record.id, "status": record.status, "subject": record.subject,
            "from": record.header_from, "message_id": record.message_id,
            "idempotency_key": record.idempotency_key, "user": user.username if user else None,
            "created_at": _iso(record.created_at), "attempts": record.attempts,
            "recipients": [{"address": r.address, "status": r.status, "code": r.code,
                            "reply": r.reply} for r in record.recipients],
            "error": explain_error(record.last_error, "en"),
        },
    }
    return await queue_event(core, record.establishment_id, settings, category,
                             f"message.{kind}", key, data)


# -- posting the webhook's events ----------------------------------------------------------------


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 with the shared secret of ``<timestamp>.<body>``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def backoff(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones: 10 s, doubling, at most
    an hour."""
    return float(min(3600, 10 * 2 ** max(0, attempts - 1)))


class WebhookSender:
    """Posts the stored events that are due. One HTTP client per process."""

    def __init__(self, core: Postier, clock: Callable[[], float] = time.time) -> None:
        self.core = core
        self.clock = clock
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            # Verified TLS, with POSTIER_CA_FILE as for the relays; no redirect followed
            # (the signed event goes where the administrator said, nowhere else).
            self._client = httpx.AsyncClient(
                verify=tls_context(RelaySettings()), follow_redirects=False,
                timeout=httpx.Timeout(POST_TIMEOUT), trust_env=False,
                headers={"User-Agent": f"Postier/{__version__}"},
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def deliver_due(self, now: float | None = None) -> int:
        """Post every due event once; how many were delivered."""
        now = self.clock() if now is None else now
        store = self.core.store
        delivered = 0
        for event in await store.take_due_events(now, HOLD):
            settings = await self.core.delivery_settings(event.establishment_id)
            error = await self._post(settings, event)
            attempts = event.attempts + 1
            if error is None:
                delivered += 1
                await store.event_done(event.id, delivered=True, attempts=attempts,
                                       next_at=None, error=None)
                continue
            give_up = not settings.alerts.webhook_url or (
                now + backoff(attempts) - event.created_at > GIVE_UP_AFTER)
            log.warning("webhook event %s (%s) not delivered (attempt %d): %s%s",
                        event.event_id, event.event, attempts, error,
                        "; given up" if give_up else "")
            await store.event_done(event.id, delivered=False, attempts=attempts,
                                   next_at=None if give_up else now + backoff(attempts),
                                   error=error[:500])
        return delivered

    async def _post(self, settings: DeliverySettings, event: OutgoingEvent) -> str | None:
        """``None`` when the receiver took the event (2xx), else what went wrong."""
        alerts = settings.alerts
        if not alerts.webhook_url or not alerts.webhook_secret:
            return "no webhook is configured any more"
        body = event.payload.encode()
        stamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(alerts.webhook_secret, stamp, body),
            TIMESTAMP_HEADER: stamp,
            "X-Postier-Event": event.event,
            "X-Postier-Event-Id": event.event_id,
        }
        try:
            answer = await asyncio.wait_for(
                self.client().post(alerts.webhook_url, content=body, headers=headers),
                POST_TIMEOUT + 1)
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        if 200 <= answer.status_code < 300:
            return None
        return f"HTTP {answer.status_code}: {answer.text[:200]}"
