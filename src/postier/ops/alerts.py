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

**Webhook.** Its events are stored and posted by :mod:`postier.ops.webhook`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from postier.core.accounts import require_admin
from postier.core.aio import cancel_and_wait
from postier.core.outage import Outage
from postier.core.settings import DeliverySettings, RelaySettings, WebhookEvent
from postier.delivery.pool import RelayPool
from postier.errors import StoreUnavailable
from postier.i18n import N_, translate
from postier.ops.webhook import WebhookSender, backoff, message_event, queue_event, sign
from postier.store.alerts import Incident
from postier.store.base import Establishment, Store, User

if TYPE_CHECKING:
    from postier.core.service import Postier
    from postier.delivery.worker import DeliveryWorker

__all__ = ["AlertEngine", "AlertTask", "WebhookSender", "attach", "backoff", "describe",
           "list_alerts", "message_event", "open_alerts", "queue_event", "sign"]

log = logging.getLogger("postier.ops.alerts")

RELAY_FAILING, QUEUE_BEHIND, OAUTH2_EXPIRY = "relay_failing", "queue_behind", "oauth2_expiry"
OAUTH2_CERTIFICATE_EXPIRY = "oauth2_certificate_expiry"  # an OAUTH2_EXPIRY's own wording
KINDS = (RELAY_FAILING, QUEUE_BEHIND, OAUTH2_EXPIRY)
# Alert e-mails go before every other e-mail waiting (normal is 0, bulk 1).
ALERT_PRIORITY = -1
CHECK_EVERY = 30.0  # seconds between two checks of the conditions

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


def describe(incident: Incident, lang: str) -> dict[str, Any]:
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


async def list_alerts(core: Postier, user: User, lang: str, limit: int = 100
                      ) -> list[dict[str, Any]]:
    """The establishment's incidents, open first (``GET /api/v1/alerts``): administrators."""
    require_admin(user)
    incidents = await core.store.list_incidents(user.establishment_id, limit)
    return [describe(i, lang) for i in incidents]


async def open_alerts(core: Postier, establishment_id: int, lang: str
                      ) -> list[dict[str, Any]]:
    """The incidents open now (the web interface's banner)."""
    return [describe(i, lang)
            for i in await core.store.open_incidents(establishment_id)]


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
    def store(self) -> Store:
        return self.core.store

    async def check(self, now: float | None = None) -> list[tuple[str, Incident]]:
        """One round over every establishment; what was announced: ``(phase, incident)``
        with phase ``raised`` or ``resolved``."""
        now = self.clock() if now is None else now
        store = self.store
        opened = {(i.establishment_id, i.kind): i for i in await store.open_incidents()}
        waiting = await store.oldest_waiting()
        done: list[tuple[str, Incident]] = []
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
                        if await store.resolve_incident(incident.id, now):
                            over = Incident(incident.id, incident.establishment_id, kind,
                                               incident.started_at, now, incident.details)
                            done.append(("resolved", over))
                            await self.announce(est, settings, over, "resolved")
            except Exception:
                log.exception("alerts of establishment %s could not be checked", est.slug)
        return done

    async def _raise(self, est: Establishment, kind: str, firing: Firing
                     ) -> Incident | None:
        # A condition that began before the last incident of its kind ended is that
        # incident, seen late by another worker (its view may be a moment old): not a new
        # one.
        last = await self.store.last_resolved(est.id, kind)
        if last is not None and firing.since <= last:
            return None
        return await self.store.open_incident(est.id, kind, firing.since, firing.details)

    async def announce(self, est: Establishment, settings: DeliverySettings,
                       incident: Incident, phase: str) -> None:
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
                          incident: Incident, phase: str) -> str | None:
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
