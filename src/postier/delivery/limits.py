"""A relay's sending limits, shared by every worker of an installation through the store.

Providers limit a mailbox, not a process: Exchange Online takes 30 e-mails a minute and
10,000 recipients a day from one account, whatever the number of Postier workers sending
through it. So the usage of each relay is counted in the database (``Store.reserve_relay``)
and every worker asks it before starting an e-mail. A worker asks for all the e-mails
waiting for the same relay at once (one round trip for a burst), and only for the e-mails
it is about to send, so nothing is reserved that another worker could have used.

A relay is known by a hash of what designates the account (kind, URL, host, port, user
name), never its secrets, so a changed password keeps counting against the same limits.

When a limit is reached the e-mail waits in place if its turn comes within
``wait_at_most`` seconds; otherwise it is deferred to when the window reopens, with a
``relay_limit`` reason, and the attempt does not count against it. The pause after a
rate-limit reply ("421 4.4.2 ... rate exceeded") is shared the same way: one worker's
reply pauses them all, and the pause doubles while the relay keeps asking. A relay without
limits costs no round trip per e-mail: its pause is read at most every ``refresh`` seconds.

A relay's ``max_connections`` (Exchange Online accepts 3 simultaneous connections per
mailbox) is shared the same way, per connection rather than per e-mail: before opening a
connection the pool takes one of the relay's numbered slots in the store
(``take_connection``), keeps it while the connection is open, renews it with the worker's
heartbeat (``renew_connections``) and gives it back when the connection closes. A killed
worker stops renewing: its slots lapse after ``lease_seconds`` and the others take them over.
Slots go round by establishment among the workers: a worker that finds no free slot notes
in the store which establishment it waits for (``relay_waiters``), a free slot goes to the
waiter whose establishment holds fewest of the relay's slots, then to the longest waiting,
and a worker holding a slot gives it back after its e-mail when another worker waits for
another establishment (after a few e-mails when it waits for the same one). Nobody waiting
costs nothing more per e-mail: the holder learns of waiters through the relay's health,
read at most every ``health_refresh`` seconds.

A relay's health is shared too (``health``): since when it keeps failing (connection, TLS,
authentication) as any worker saw it, written once when a worker first sees it fail and
once when one finds it answering again. The failover to the backup relay and the alerts
read it, at most every ``health_refresh`` seconds per relay, so every worker switches to
the backup and back together, and an incident opens once whichever worker saw the failures.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from postier.core.outage import Outage
from postier.core.settings import RelaySettings
from postier.errors import DeliveryError
from postier.i18n import N_
from postier.store.base import RelayGrant, RelayHealth, RelayLimits, RelayPause, Store

# A worker reserves pace slots at most this far ahead of now.
RESERVE_HORIZON = 10.0
# An e-mail whose turn comes within this many seconds waits, still claimed; a later one is
# deferred to its turn.
WAIT_AT_MOST = 15.0
# How old a relay's shared pause may be when the relay has no limits of its own.
PAUSE_REFRESH = 2.0
# How long a connection slot is held without renewal: the message leases' default, so a
# killed worker's slots come back when its messages do.
CONNECTION_LEASE = 120.0
# When every connection slot stayed taken for ``wait_at_most`` seconds, the e-mail is
# deferred by this much.
CONNECTION_RETRY = 15.0
# How old a relay's shared health (failing state, waiters for its slots) may be.
HEALTH_REFRESH = 1.0
# A worker holding a connection slot while another worker waits for the same establishment
# gives it back after this many of its e-mails in a row (a new connection each time costs
# the relay's handshake, so not after every one).
SAME_TURN = 5

_LIMIT_TEXT = {
    "minute": N_("Sending limit of the relay reached: {limit:,} e-mails per minute; "
                 "sending resumes at {resume}."),
    "hour": N_("Sending limit of the relay reached: {limit:,} e-mails per hour; sending "
               "resumes at {resume}."),
    "day": N_("Sending limit of the relay reached: {limit:,} recipients per day; sending "
              "resumes at {resume}."),
    "connections": N_("Connection limit of the relay reached: its {limit:,} simultaneous "
                      "connections are all in use by Postier's workers; sending resumes at "
                      "{resume}."),
}


def relay_key(relay: RelaySettings) -> str:
    """A stable name for the account a relay sends as, without any secret."""
    return _relay_key((relay.kind.value, relay.url, relay.host.lower(), relay.port,
                       relay.username.lower()))


@functools.lru_cache(maxsize=4096)
def _relay_key(ident: tuple[Any, ...]) -> str:
    # Asked once per e-mail delivered: hashed once per relay account.
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]


def limit_error(blocked: str, relay: RelaySettings, resume_at: float) -> DeliveryError:
    limit = {"minute": relay.max_per_minute, "hour": relay.max_per_hour,
             "day": relay.max_recipients_per_day,
             "connections": relay.max_connections}[blocked]
    return DeliveryError(
        _LIMIT_TEXT[blocked],
        hint=N_("Nothing to do: the e-mail leaves by itself then, and waiting does not "
                "count as a failed attempt. To send more, raise the relay's limit if the "
                "provider allows it."),
        code="relay_limit", transient=True, step="limit", limit=limit,
        resume=time.strftime("%Y-%m-%d %H:%M", time.localtime(resume_at)),
        resume_at=resume_at, host=relay.host, port=relay.port,
    )


def error_from(doc: str | None) -> DeliveryError | None:
    """A relay's reply stored with the shared pause, as the error it was."""
    if not doc:
        return None
    data = json.loads(doc)
    params = dict(data.get("params") or {})
    reply, step = str(params.pop("reply", "")), str(params.pop("step", ""))
    return DeliveryError(
        data.get("template"), hint=data.get("hint"), code=data.get("code", "rate_limited"),
        transient=True, smtp_code=data.get("smtp_code"), reply=reply, step=step, **params,
    )


@dataclass(eq=False)
class ConnectionLease:
    """One of a relay's connection slots, held by this process while a connection is open.

    ``expires_at`` is when the store's lease runs out unless renewed; ``lost`` is set when
    a renewal found the slot taken over (this process was cut off past its lease): the
    connection must then close as soon as it is idle."""

    relay_key: str
    slot: int
    expires_at: float
    lost: bool = False
    released: bool = False
    # The establishment whose e-mail the connection carries last, and how many in a row
    # for it (what handing the slot round looks at).
    establishment: int = 0
    run: int = 0

    def usable(self, now: float) -> bool:
        return not self.lost and not self.released and now < self.expires_at


@dataclass
class _Ask:
    recipients: int
    answer: asyncio.Future[tuple[float | None, str | None, float, RelayGrant]]


@dataclass
class _Relay:
    asks: list[_Ask] = field(default_factory=list)
    flushing: asyncio.Task[None] | None = None
    pause: RelayPause | None = None
    read_at: float = float("-inf")
    reading: asyncio.Future[None] | None = None
    health: RelayHealth = field(default_factory=RelayHealth)
    health_at: float = float("-inf")
    health_reading: asyncio.Future[None] | None = None


class SharedLimits:
    """The relays' limits and pauses as every worker sees them (one per process)."""

    def __init__(
        self,
        store: Store,
        *,
        hour: float = 3600.0,
        day: float = 86400.0,
        horizon: float = RESERVE_HORIZON,
        wait_at_most: float = WAIT_AT_MOST,
        refresh: float = PAUSE_REFRESH,
        health_refresh: float = HEALTH_REFRESH,
        lease_seconds: float = CONNECTION_LEASE,
        clock: Callable[[], float] = time.time,
        holder: str | None = None,
        mac: Callable[[str], str] | None = None,
    ) -> None:
        self.store = store
        self.mac = mac
        self._health_keys: dict[tuple[Any, ...], str] = {}
        self.lease_seconds = lease_seconds
        # Who holds this process's connection slots in the store.
        self.holder = holder or (
            f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
        self._leases: dict[tuple[str, int], ConnectionLease] = {}
        self.hour = hour
        self.day = day
        self.horizon = horizon
        self.wait_at_most = wait_at_most
        self.refresh = refresh
        self.health_refresh = health_refresh
        self._health_outage = Outage("relays' health shared with the other workers")
        self.clock = clock
        self._relays: dict[str, _Relay] = {}

    def limits(self, relay: RelaySettings) -> RelayLimits:
        return RelayLimits(relay.max_per_minute, relay.max_per_hour,
                           relay.max_recipients_per_day, self.hour, self.day)

    def _relay(self, key: str) -> _Relay:
        state = self._relays.get(key)
        if state is None:
            state = self._relays[key] = _Relay()
        return state

    async def admit(self, relay: RelaySettings, recipients: int) -> RelayPause | None:
        """Wait for an e-mail's turn on ``relay``. Returns the relay's shared pause when it
        asked to slow down (the caller defers the e-mail with that reply); raises a
        ``relay_limit`` DeliveryError when the turn is too far away to wait for."""
        key = relay_key(relay)
        limits = self.limits(relay)
        state = self._relay(key)
        while True:
            if not limits.any:
                await self._read_pause(key, state)
                pause = state.pause
                return pause if pause is not None and pause.paused_until > self.clock() \
                    else None
            start, blocked, resume_at, grant = await self._reserve(key, state, limits,
                                                                   recipients)
            state.pause = RelayPause(grant.paused_until, grant.pause, grant.pause_error)
            state.read_at = self.clock()
            now = self.clock()
            if start is not None:
                if start > now:
                    await asyncio.sleep(start - now)
                return None
            if blocked == "pause":
                return state.pause
            assert blocked is not None
            if resume_at - now > self.wait_at_most:
                raise limit_error(blocked, relay, resume_at)
            await asyncio.sleep(max(resume_at - now, 0.01))

    async def _reserve(
        self, key: str, state: _Relay, limits: RelayLimits, recipients: int
    ) -> tuple[float | None, str | None, float, RelayGrant]:
        loop = asyncio.get_running_loop()
        ask = _Ask(recipients, loop.create_future())
        state.asks.append(ask)
        if state.flushing is None:
            state.flushing = loop.create_task(self._flush(key, state, limits))
        return await ask.answer

    async def _flush(self, key: str, state: _Relay, limits: RelayLimits) -> None:
        # The e-mails that asked meanwhile go in the same reservation.
        await asyncio.sleep(0)
        try:
            while state.asks:
                asks, state.asks = state.asks, []
                try:
                    grant = await self.store.reserve_relay(
                        key, limits, [a.recipients for a in asks], self.clock(),
                        self.horizon)
                except Exception as exc:
                    for a in asks:
                        if not a.answer.done():
                            a.answer.set_exception(exc)
                    continue
                for i, a in enumerate(asks):
                    if not a.answer.done():
                        a.answer.set_result(
                            (grant.starts[i], grant.blocked[i], grant.resume_at[i], grant))
        finally:
            state.flushing = None

    async def _read_pause(self, key: str, state: _Relay) -> None:
        if self.clock() - state.read_at < self.refresh:
            return
        if state.reading is not None:
            await asyncio.shield(state.reading)
            return
        state.reading = asyncio.get_running_loop().create_future()
        try:
            state.pause = await self.store.relay_pause(key)
            state.read_at = self.clock()
        finally:
            state.reading.set_result(None)
            state.reading = None

    async def slowed_down(
        self, relay: RelaySettings, err: DeliveryError, pause: float, max_pause: float
    ) -> RelayPause:
        """The relay asked to slow down: every worker pauses it."""
        key = relay_key(relay)
        state = self._relay(key)
        state.pause = await self.store.pause_relay(
            key, self.clock(), pause, max_pause, json.dumps(err.dump()))
        state.read_at = self.clock()
        return state.pause

    async def went_through(self, relay: RelaySettings) -> None:
        """An e-mail went through: the next pause starts short again (a write only when
        the relay had been paused)."""
        key = relay_key(relay)
        state = self._relay(key)
        if state.pause is not None and state.pause.pause:
            state.pause = RelayPause(state.pause.paused_until, 0.0, state.pause.error)
            await self.store.relay_recovered(key)

    # -- the relay's health, as every worker sees it ----------------------------------------

    async def health(self, relay: RelaySettings) -> RelayHealth:
        """The relay's shared failing state and its slots' waiters, at most
        ``health_refresh`` seconds old (one round trip per relay that often, shared by
        the e-mails asking meanwhile)."""
        state = self._relay(self.health_key(relay))
        if self.clock() - state.health_at >= self.health_refresh:
            if state.health_reading is not None:
                await asyncio.shield(state.health_reading)
            else:
                await self._read_health(relay, state)
        return state.health

    async def _read_health(self, relay: RelaySettings, state: _Relay) -> None:
        state.health_reading = asyncio.get_running_loop().create_future()
        try:
            state.health = await self.store.relay_health(
                self.health_key(relay), self.clock(),
                relay_key(relay) if relay.max_connections else None, self.holder)
            self._health_outage.worked()
        except Exception as exc:
            # The store is away: the last view stands until it answers again.
            self._health_outage.failed(exc)
        finally:
            state.health_at = self.clock()
            state.health_reading.set_result(None)
            state.health_reading = None

    async def relay_failing(self, relay: RelaySettings) -> None:
        """This worker saw the relay fail (the first failure of a run): every worker
        counts its failing time from the first such failure any of them saw."""
        key = self.health_key(relay)
        state = self._relay(key)
        since = await self.store.relay_failing(key, self.clock())
        state.health = RelayHealth(since, state.health.recovered_at, state.health.waiting)

    async def relay_answered(self, relay: RelaySettings) -> None:
        """The relay answered this worker: when it was failing as every worker saw it, it
        no longer is, for all. A write only then."""
        key = self.health_key(relay)
        state = self._relay(key)
        if (await self.health(relay)).failing_since is None:
            return
        now = self.clock()
        await self.store.relay_answered(key, now)
        state.health = RelayHealth(None, now, state.health.waiting)

    async def probe_turn(self, relay: RelaySettings, every: float) -> bool:
        """Whether this worker probes the failing relay now: one worker does, every
        ``every`` seconds, for all."""
        return await self.store.claim_relay_probe(self.health_key(relay), self.clock(),
                                                  every)

    def health_key(self, relay: RelaySettings) -> str:
        """What the relay's health is shared under: its whole connection settings,
        secrets included (the same account with another password or security may well
        fail where this one works, and must not send every worker to the backup), as a
        keyed digest (``mac``: the installation's secret key) so the database alone does
        not let anybody try passwords against it. Without ``mac``, the settings without
        their secrets."""
        ident = relay.key()
        key = self._health_keys.get(ident)
        if key is None:
            if self.mac is not None:
                key = "h" + self.mac(json.dumps(ident, default=str))[:31]
            else:
                key = "h" + relay_key(relay)[:23] + _relay_key(
                    (relay.security.value, relay.auth.value))[:8]
            self._health_keys[ident] = key
        return key

    # -- connection slots (max_connections) -------------------------------------------------

    async def take_connection(
        self, relay: RelaySettings, establishment: int = 0, *, queue: bool = True
    ) -> ConnectionLease | None:
        """One of the relay's ``max_connections`` slots for a new connection carrying an
        ``establishment``'s e-mail, or None when all are held (by any worker) or the next
        free one is another waiter's; then this worker waits in line for it (unless not
        ``queue``: a probe). One round trip."""
        assert relay.max_connections
        key = relay_key(relay)
        now = self.clock()
        slot = await self.store.take_relay_slot(key, relay.max_connections, self.holder, now,
                                                self.lease_seconds, establishment,
                                                queue=queue)
        if slot is None:
            return None
        lease = ConnectionLease(key, slot, now + self.lease_seconds, establishment=establishment)
        self._leases[(key, slot)] = lease
        return lease

    async def hand_round(self, relay: RelaySettings, lease: ConnectionLease,
                         establishment: int) -> bool:
        """Whether to give the slot back after an e-mail of ``establishment`` rather than
        keep its connection: another worker waits for it, for another establishment, or
        for this one after ``SAME_TURN`` e-mails in a row. No round trip but the health's."""
        if lease.establishment != establishment:
            lease.establishment, lease.run = establishment, 0
        lease.run += 1
        waiting = (await self.health(relay)).waiting
        return bool(waiting - {establishment}) or (
            establishment in waiting and lease.run >= SAME_TURN)

    async def release_connection(self, lease: ConnectionLease, *,
                                 handed_round: bool = False) -> None:
        """The connection closed: its slot is free for every worker (``handed_round``:
        given up for the waiters, so this worker's own waits go behind theirs)."""
        if lease.released:
            return
        lease.released = True
        if self._leases.get((lease.relay_key, lease.slot)) is lease:
            del self._leases[(lease.relay_key, lease.slot)]
        if not lease.lost:
            await self.store.release_relay_slot(
                lease.relay_key, lease.slot, self.holder,
                self.clock() if handed_round else None)

    async def renew_connections(self) -> None:
        """Extend the leases of this process's open connections (its heartbeat); a lease
        another worker took over meanwhile is marked lost. No round trip without any."""
        if not self._leases:
            return
        held_before = dict(self._leases)
        now = self.clock()
        held = await self.store.renew_relay_slots(self.holder, list(held_before), now,
                                                  self.lease_seconds)
        for key, lease in held_before.items():
            if key in held:
                lease.expires_at = now + self.lease_seconds
            elif not lease.released:
                lease.lost = True
                if self._leases.get(key) is lease:
                    del self._leases[key]

    def connections_full(self, relay: RelaySettings) -> DeliveryError:
        """Why an e-mail is deferred when no connection slot came free in time."""
        return limit_error("connections", relay, self.clock() + CONNECTION_RETRY)

    @property
    def connections_held(self) -> int:
        return len(self._leases)
