"""Alerts to an establishment's administrators, and the signed webhook for integrators.

**Incidents.** :class:`AlertEngine` checks, for each establishment, three conditions:

- ``relay_failing``: the relay (and the backup relay, when there is one) has kept failing
  for ``alerts.relay_failing_after`` seconds, as any worker saw it (the failover state
  shared through the store, :class:`postier.delivery.limits.SharedLimits`); a relay no
  worker has seen fail or come back, and this process never tried, gives no opinion, and
  a failing one is probed in the background so that its return is seen even when nothing
  is being sent;
- ``queue_behind``: an e-mail still waiting (queued, being sent or deferred) was accepted
  more than ``alerts.oldest_deferred_after`` seconds ago;
- ``oauth2_expiry``: an OAuth2 client secret (or certificate) expires within
  ``alerts.credential_expiry_days``.

An incident is a row of ``incidents``: opening it is an atomic insert against a partial
unique index and closing it an update of an open row, so each is done by exactly one
process, which then announces it — once when it starts, once when it is over, whatever
the number of checks or workers. A new incident of a kind must have begun after the
previous one of that kind began, so two workers that see a relay differently cannot make
it flap.

**Channels.** An e-mail to the establishment's administrators (French, then English, like
the sender notices; queued ahead of every other e-mail, through whichever relay works), a
banner in the web interface while the incident is open (``open_alerts()``), and the
webhook.

**Webhook.** Events (``alert.raised``, ``alert.resolved``, and for integrators
``message.failed``, ``message.delayed``, ``message.sent``) are first stored in the
``webhook_outbox`` table, so none is lost across restarts and delivery never waits for
them; :class:`AlertTask` posts them from the background of the delivery process, JSON
signed with HMAC-SHA256 (``X-Postier-Signature: sha256=<hex>`` over
``<X-Postier-Timestamp>.<body>``), with bounded timeouts, TLS verified, no redirects
followed, and retries with exponential backoff for three days.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from postier import __version__
from postier.core.administration import require_admin
from postier.core.aio import cancel_and_wait
from postier.core.outage import Outage
from postier.core.settings import DeliverySettings, RelaySettings, WebhookEvent
from postier.delivery.relay import RelayPool, tls_context
from postier.errors import StoreUnavailable
from postier.i18n import N_, translate
from postier.store import alerts as db
from postier.store.base import Establishment, User
from postier.store.sql import SQLStore

if TYPE_CHECKING:
    from postier.core.service import Postier
    from postier.delivery.worker import DeliveryWorker

log = logging.getLogger("postier.ops.alerts")

RELAY_FAILING, QUEUE_BEHIND, OAUTH2_EXPIRY = "relay_failing", "queue_behind", "oauth2_expiry"
OAUTH2_CERTIFICATE_EXPIRY = "oauth2_certificate_expiry"  # an OAUTH2_EXPIRY's own wording
KINDS = (RELAY_FAILING, QUEUE_BEHIND, OAUTH2_EXPIRY)
# Alert e-mails go before every other e-mail waiting (normal is 0, bulk 1).
ALERT_PRIORITY = -1
CHECK_EVERY = 30.0  # seconds between two checks of the conditions
POST_TIMEOUT = 10.0  # seconds, for the whole webhook request
HOLD = 60.0  # seconds a process keeps an event it is posting from the others
GIVE_UP_AFTER = 3 * 86400.0
SIGNATURE_HEADER = "X-Postier-Signature"
TIMESTAMP_HEADER = "X-Postier-Timestamp"

KIND_LABELS = {
    RELAY_FAILING: N_("The relay is failing"),
    QUEUE_BEHIND: N_("E-mails are waiting too long"),
    OAUTH2_EXPIRY: N_("An OAuth2 client secret expires soon"),
}
MESSAGES = {
    RELAY_FAILING: N_("The relay {relay} has been failing since {since}: e-mails are waiting "
                      "in the queue."),
    "relay_failing_both": N_("The relay {relay} and the backup relay {backup} have been "
                             "failing since {since}: e-mails are waiting in the queue."),
    QUEUE_BEHIND: N_("E-mails are waiting too long: the oldest was accepted on {accepted} "
                     "({count} e-mails waiting)."),
    OAUTH2_EXPIRY: N_("The OAuth2 client secret of {relay} expires on {date}."),
    OAUTH2_CERTIFICATE_EXPIRY: N_("The OAuth2 certificate of {relay} expires on {date}."),
}
HINTS = {
    RELAY_FAILING: N_("Nothing is lost: Postier keeps trying. Check the relay with the "
                      "test-send of the sending settings; the queue shows its last reply."),
    QUEUE_BEHIND: N_("Open the queue: each e-mail shows why it waits (the relay's reply)."),
    OAUTH2_EXPIRY: N_("Create a new client secret with the provider, then enter it and its "
                      "expiry date in the sending settings: when it expires, e-mails stop "
                      "leaving."),
    OAUTH2_CERTIFICATE_EXPIRY: N_(
        "Make a new certificate, register it on the application in Entra ID, then paste "
        "it and its private key in the sending settings: when the certificate expires, "
        "e-mails stop leaving."),
}
ALERT_SUBJECT = N_("Postier alert")
OVER_SUBJECT = N_("Postier alert over")
RAISED_BODY = N_("{message}\n\nWhat to do: {hint}\n\nEstablishment: {establishment}. You "
                 "receive one e-mail when an incident starts and one when it is over.")
RESOLVED_BODY = N_("It is over: {message}\n\nThe incident began on {since} and ended on "
                   "{end}. Establishment: {establishment}.")


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def describe(incident: db.Incident, lang: str) -> dict[str, Any]:
    """An incident as every interface shows it, in the reader's language."""
    template = MESSAGES.get(incident.details.get("template", incident.kind), "")
    params = incident.details.get("params", {})
    hint = HINTS.get(incident.details.get("template", ""), HINTS.get(incident.kind))
    return {
        "id": incident.id,
        "kind": incident.kind,
        "status": "open" if incident.open else "resolved",
        "title": translate(lang, KIND_LABELS.get(incident.kind, incident.kind)),
        "message": translate(lang, template, **params) if template else incident.kind,
        "hint": translate(lang, hint) if hint else None,
        "started_at": _iso(incident.started_at),
        "resolved_at": _iso(incident.resolved_at),
        "details": {k: v for k, v in incident.details.items() if k not in ("params",
                                                                            "template")},
    }


def sql_store(core: Postier) -> SQLStore:
    store = core.store
    if not isinstance(store, SQLStore):  # pragma: no cover - every backend is SQL today
        raise TypeError(f"{type(store).__name__} is not an SQL store")
    return store


async def list_alerts(core: Postier, user: User, lang: str, limit: int = 100
                      ) -> list[dict[str, Any]]:
    """The establishment's incidents, open first (``GET /api/v1/alerts``): administrators."""
    require_admin(user)
    incidents = await db.list_incidents(sql_store(core), user.establishment_id, limit)
    return [describe(i, lang) for i in incidents]


async def open_alerts(core: Postier, establishment_id: int, lang: str
                      ) -> list[dict[str, Any]]:
    """The incidents open now (the web interface's banner)."""
    return [describe(i, lang)
            for i in await db.open_incidents(sql_store(core), establishment_id)]


# -- conditions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Firing:
    since: float  # when the condition began (epoch seconds)
    details: dict[str, Any]


CLEAR = "clear"  # known not to hold: an open incident of this kind is over
UNKNOWN = "unknown"  # no opinion from this process: nothing changes
Condition = Firing | str


class AlertEngine:
    """Checks the conditions and opens, closes and announces incidents. ``clock`` gives
    the time (tests move it forward instead of sleeping)."""

    def __init__(self, core: Postier, pool: RelayPool | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.core = core
        self.pool = pool
        self.clock = clock
        self.wake = asyncio.Event()  # set when an event waits to be posted

    @property
    def store(self) -> SQLStore:
        return sql_store(self.core)

    async def check(self, now: float | None = None) -> list[tuple[str, db.Incident]]:
        """One round over every establishment; what was announced: ``(phase, incident)``
        with phase ``raised`` or ``resolved``."""
        now = self.clock() if now is None else now
        store = self.store
        opened = {(i.establishment_id, i.kind): i for i in await db.open_incidents(store)}
        waiting = await db.oldest_waiting(store)
        done: list[tuple[str, db.Incident]] = []
        for est in await store.list_establishments():
            if est.disabled:
                continue
            try:
                settings = await self.core.delivery_settings(est.id)
                conditions = {
                    RELAY_FAILING: await self._relay(settings, now),
                    QUEUE_BEHIND: _queue(settings, now, waiting.get(est.id)),
                    OAUTH2_EXPIRY: _expiry(settings, now),
                }
                for kind, condition in conditions.items():
                    incident = opened.get((est.id, kind))
                    if isinstance(condition, Firing) and incident is None:
                        raised = await self._raise(est, kind, condition)
                        if raised is not None:
                            done.append(("raised", raised))
                            await self.announce(est, settings, raised, "raised")
                    elif condition == CLEAR and incident is not None:
                        if await db.resolve_incident(store, incident.id, now):
                            over = db.Incident(incident.id, incident.establishment_id, kind,
                                               incident.started_at, now, incident.details)
                            done.append(("resolved", over))
                            await self.announce(est, settings, over, "resolved")
            except Exception:
                log.exception("alerts of establishment %s could not be checked", est.slug)
        return done

    async def _raise(self, est: Establishment, kind: str, firing: Firing
                     ) -> db.Incident | None:
        # A condition that began before the last incident of its kind ended is that
        # incident, seen late by another worker (its view may be a moment old): not a new
        # one.
        last = await db.last_resolved(self.store, est.id, kind)
        if last is not None and firing.since <= last:
            return None
        return await db.open_incident(self.store, est.id, kind, firing.since, firing.details)

    async def announce(self, est: Establishment, settings: DeliverySettings,
                       incident: db.Incident, phase: str) -> None:
        """Every configured channel, once (each has its own key per incident and phase);
        the banner needs nothing: it shows the open incidents."""
        log.warning("alert %s for %s: %s (incident %d)", phase, est.slug,
                    describe(incident, "en")["message"], incident.id)
        if settings.alerts.email:
            try:
                await _announce_email(self.core, est, settings, incident, phase)
            except Exception:
                log.exception("could not queue the alert e-mail of incident %d", incident.id)
        if await queue_event(self.core, est.id, settings, WebhookEvent.ALERTS,
                             f"alert.{phase}", f"alert:{incident.id}:{phase}",
                             describe(incident, "en")):
            self.wake.set()

    async def _relay(self, settings: DeliverySettings, now: float) -> Condition:
        pool = self.pool
        main = settings.relay
        if pool is None or not main.configured:
            return UNKNOWN
        relays = [main]
        backup = settings.backup_relay
        if backup is not None and backup.configured:
            relays.append(backup)
        starts: list[float] = []
        for relay in relays:
            if not await pool.known(relay):
                continue
            failing_since = await pool.failing_since(relay)
            if failing_since is None:
                return CLEAR  # one of them delivers
            # Probed in the background (at most every few seconds): its return is seen
            # even when no e-mail is being sent.
            pool.probe_later(relay)
            starts.append(failing_since)
        if len(starts) < len(relays):
            return UNKNOWN
        since = max(starts)
        if now - since < settings.alerts.relay_failing_after:
            return UNKNOWN
        params = {"relay": main.describe(), "since": _when(since)}
        template = RELAY_FAILING
        if len(relays) > 1:
            params["backup"] = relays[1].describe()
            template = "relay_failing_both"
        return Firing(since, {"template": template, "params": params,
                              "relay": main.describe(),
                              "backup_relay": relays[1].describe() if len(relays) > 1
                              else None})


def _queue(settings: DeliverySettings, now: float, oldest: tuple[float, int] | None
           ) -> Condition:
    limit = settings.alerts.oldest_deferred_after
    if oldest is None or now - oldest[0] < limit:
        return CLEAR
    accepted, count = oldest
    return Firing(accepted + limit, {
        "params": {"accepted": _when(accepted), "count": count},
        "oldest_accepted_at": _iso(accepted), "waiting": count,
    })


def _expiry(settings: DeliverySettings, now: float) -> Condition:
    soonest: tuple[dt.date, RelaySettings, str] | None = None
    for relay in (settings.relay, settings.backup_relay):
        if relay is None:
            continue
        for kind, date in relay.oauth2_expiries():
            if soonest is None or date < soonest[0]:
                soonest = (date, relay, kind)
    if soonest is None:
        return CLEAR
    date, relay, kind = soonest
    expires = dt.datetime.combine(date, dt.time(), dt.UTC).timestamp()
    warn_from = expires - settings.alerts.credential_expiry_days * 86400
    if now < warn_from:
        return CLEAR
    details = {"params": {"relay": relay.describe(), "date": date.isoformat()},
               "relay": relay.describe(), "expires": date.isoformat()}
    if kind == "certificate":
        details["template"] = OAUTH2_CERTIFICATE_EXPIRY
    return Firing(warn_from, details)


# -- channels -----------------------------------------------------------------------------------


async def _announce_email(core: Postier, est: Establishment, settings: DeliverySettings,
                          incident: db.Incident, phase: str) -> str | None:
    admins = [u.email for u in await core.store.list_users(est.id)
              if u.role == "admin" and not u.disabled and u.email]
    if not admins:
        return None

    def text(lang: str) -> str:
        shown = describe(incident, lang)
        if phase == "raised":
            return translate(lang, RAISED_BODY, message=shown["message"], hint=shown["hint"],
                             establishment=est.name)
        return translate(lang, RESOLVED_BODY, message=shown["message"],
                         since=_when(incident.started_at),
                         end=_when(incident.resolved_at or time.time()),
                         establishment=est.name)

    subject = OVER_SUBJECT if phase == "resolved" else ALERT_SUBJECT
    label = KIND_LABELS[incident.kind]
    return await core.system_email(
        est.id, list(dict.fromkeys(admins)),
        f"{translate('fr', subject)} / {subject} : {translate('fr', label)} / {label}",
        "\n\n".join([text("fr"), "-- English --", text("en")]),
        headers={"X-Postier-Alert": f"{incident.kind}; {phase}"},
        idempotency_key=f"alert:{incident.id}:{phase}", settings=settings,
        priority=ALERT_PRIORITY,
    )


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
    return await db.add_event(sql_store(core), establishment_id, event_id, event, dedupe_key,
                              body, now)


# -- events about e-mails, for integrators -----------------------------------------


def _wanted(settings: DeliverySettings, category: WebhookEvent) -> bool:
    return bool(settings.alerts.webhook_url) and category in settings.alerts.webhook_events


async def message_event(core: Postier, message_id: str, kind: str,
                        establishment_id: int | None = None) -> bool:
    """Store ``message.failed``, ``message.delayed`` or ``message.sent`` for an e-mail,
    when the establishment's webhook takes it. Each is stored once per state: ``failed``
    again only when more recipients have failed, ``delayed`` once per e-mail. Knowing
    ``establishment_id`` spares reading the e-mail when nobody wants the event."""
    from postier.core.service import NOTICE_PREFIX, SYSTEM_USER, explain_error

    category = {"failed": WebhookEvent.FAILURES, "delayed": WebhookEvent.DELAYS,
                "sent": WebhookEvent.SENT}[kind]
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
    key = {"failed": f"failed:{record.id}:{len(failed)}", "delayed": f"delayed:{record.id}",
           "sent": f"sent:{record.id}"}[kind]
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
        store = sql_store(self.core)
        delivered = 0
        for event in await db.take_due(store, now, HOLD):
            settings = await self.core.delivery_settings(event.establishment_id)
            error = await self._post(settings, event)
            attempts = event.attempts + 1
            if error is None:
                delivered += 1
                await db.event_done(store, event.id, delivered=True, attempts=attempts,
                                    next_at=None, error=None)
                continue
            give_up = not settings.alerts.webhook_url or (
                now + backoff(attempts) - event.created_at > GIVE_UP_AFTER)
            log.warning("webhook event %s (%s) not delivered (attempt %d): %s%s",
                        event.event_id, event.event, attempts, error,
                        "; given up" if give_up else "")
            await db.event_done(store, event.id, delivered=False, attempts=attempts,
                                next_at=None if give_up else now + backoff(attempts),
                                error=error[:500])
        return delivered

    async def _post(self, settings: DeliverySettings, event: db.OutgoingEvent) -> str | None:
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


async def _survive(outage: Outage, failure: str, step: Callable[[], Awaitable[object]]
                   ) -> None:
    """One round of a background step: the store away is said once per outage (the next
    round tries again), anything else with its stack."""
    try:
        await step()
    except StoreUnavailable as exc:
        outage.failed(exc)
        return
    except Exception:
        log.exception(failure)
        return
    outage.worked()


class AlertTask:
    """The background of a delivering process: checks every ``CHECK_EVERY`` seconds, posts
    the webhook's due events every few seconds or as soon as one is stored."""

    def __init__(self, core: Postier, pool: RelayPool | None, *,
                 check_every: float = CHECK_EVERY, post_every: float = 5.0) -> None:
        self.engine = AlertEngine(core, pool)
        self.sender = WebhookSender(core)
        self.check_every = check_every
        self.post_every = post_every
        self._task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        self.engine.wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="postier-alerts")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.sender.close()

    async def _run(self) -> None:
        next_check = time.monotonic() + min(10.0, self.check_every)
        checks, posts = Outage("alert checks"), Outage("webhook events")
        while True:
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.check_every
                await _survive(checks, "alert check failed; will try again",
                               self.engine.check)
            await _survive(posts, "posting webhook events failed; will try again",
                           self.sender.deliver_due)
            self.engine.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.engine.wake.wait(), self.post_every)


def notifying(core: Postier, task: AlertTask | None, kind: str,
              first: Callable[[str], Awaitable[object]] | None = None
              ) -> Callable[[str], Awaitable[None]]:
    """A worker callback (``on_failure``, ``on_delay``): ``first`` (the sender's notice)
    then the webhook event; one failing does not stop the other."""

    async def callback(message_id: str) -> None:
        if first is not None:
            try:
                await first(message_id)
            except Exception:
                log.exception("could not tell the sender about %s", message_id)
        if await message_event(core, message_id, kind) and task is not None:
            task.notify()

    return callback


def on_sent(core: Postier, task: AlertTask | None) -> Callable[[str, int], Awaitable[None]]:
    """The worker's ``on_sent``: a ``message.sent`` event when the webhook takes them (the
    establishment's cached settings say so without reading the e-mail)."""

    async def callback(message_id: str, establishment_id: int) -> None:
        if await message_event(core, message_id, "sent", establishment_id) and task:
            task.notify()

    return callback


def attach(core: Postier, worker: DeliveryWorker) -> AlertTask:
    """The alerts and webhook of a delivering process: checks with the worker's relay pool,
    and the worker's notices followed by the webhook's events about e-mails."""
    task = AlertTask(core, worker.pool)
    worker.on_failure = notifying(core, task, "failed", worker.on_failure)
    worker.on_delay = notifying(core, task, "delayed", worker.on_delay)
    worker.on_sent = on_sent(core, task)
    return task
