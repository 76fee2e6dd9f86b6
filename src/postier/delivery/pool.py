"""The relay pool: open connections per relay, reused across e-mails, shared fairly.

:class:`RelayPool` is how delivery talks to relays: it bounds the connections per relay
(per process and, with shared limits, for all the workers together), paces the e-mails,
pauses when a relay asks to slow down, marks a relay down after a failed connection, and
keeps the relay's failing state that the backup relay's failover and the alerts read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from postier.core.settings import RelaySettings
from postier.delivery.connection import open_session, open_smtp
from postier.delivery.limits import error_from
from postier.delivery.session import RelaySession
from postier.delivery.slots import PrioritySlots
from postier.delivery.transaction import TransactionResult, same_for_all, send_on
from postier.errors import DeliveryError
from postier.i18n import N_

if TYPE_CHECKING:
    from postier.delivery.limits import ConnectionLease, SharedLimits
    from postier.store.base import RelayPause

log = logging.getLogger("postier.delivery")


@dataclass
class _Idle:
    smtp: RelaySession
    since: float
    # The relay's shared connection slot this connection holds (max_connections).
    lease: ConnectionLease | None = None


# Given the relay's answer to an e-mail; the worker records the result there. The
# connection's next e-mail may start meanwhile, but its content waits for that record, so
# that at any instant each connection has at most one e-mail the relay took whose result
# the store does not hold yet (what a killed worker may repeat).
Settle = Callable[[TransactionResult], Awaitable[None]]


class LeaseLost(Exception):
    """The worker no longer holds the message: another worker may be sending it."""


class _RelayState:
    def __init__(self, concurrency: int, rate_pause: float) -> None:
        self.slots = PrioritySlots(concurrency)
        self.idle: list[_Idle] = []
        self.down_until = 0.0
        self.down_error: DeliveryError | None = None
        # The settings the relay failed with: once they change (an administrator fixed
        # them), the relay is tried again at once rather than at the window's end.
        self.down_with: RelaySettings | None = None
        # Pace: the earliest time the next message may start (max_per_minute), and a pause
        # after the relay asked to slow down, longer each time it asks again in a row.
        self.next_start = 0.0
        self.paused_until = 0.0
        self.rate_pause = rate_pause
        self.pause = rate_pause
        self.pause_error: DeliveryError | None = None
        # Since when the relay keeps failing (connection, TLS, authentication): what the
        # backup relay's failover looks at. None while it answers.
        self.failing_since: float | None = None
        self.last_probe = 0.0
        # Set (then replaced) when a connection goes idle or a shared slot is given back:
        # what e-mails waiting for a connection slot wait on between two asks.
        self.freed = asyncio.Event()

    def signal_freed(self) -> None:
        self.freed.set()
        self.freed = asyncio.Event()

    def failed(self, err: DeliveryError) -> None:
        if err.transient and err.code in FAILOVER_CODES and self.failing_since is None:
            self.failing_since = time.monotonic()

    def answered(self) -> None:
        self.failing_since = None

    async def pace(self, per_minute: int | None) -> None:
        if not per_minute:
            return
        now = time.monotonic()
        start = max(now, self.next_start)
        self.next_start = start + 60.0 / per_minute
        if start > now:
            await asyncio.sleep(start - now)

    def slowed_down(self, err: DeliveryError) -> None:
        now = time.monotonic()
        if now >= self.paused_until:
            self.paused_until = now + self.pause
            self.pause = min(self.pause * 2, max(RATE_PAUSE_MAX, self.rate_pause))
        self.pause_error = err

    def went_through(self) -> None:
        self.pause = self.rate_pause

    def shared_pause(self, pause: RelayPause) -> None:
        """Another worker (or this one) paused the relay for everyone until then."""
        remaining = pause.paused_until - time.time()
        if remaining > 0:
            self.paused_until = max(self.paused_until, time.monotonic() + remaining)
            self.pause_error = error_from(pause.error) or self.pause_error or DeliveryError(
                N_("The SMTP server asks to slow down ({reply_code} {reply})."),
                code="rate_limited", transient=True, reply_code="", reply="")


# Failures that say the relay itself is unusable (not a refusal of this e-mail).
FAILOVER_CODES = frozenset({
    "refused", "timeout", "dns", "tls_failed", "tls_certificate", "tls_expected",
    "tls_unexpected", "tls_required", "starttls_unavailable", "auth_failed",
    "auth_required", "auth_unsupported", "disconnected", "oauth2_refused",
    "oauth2_unreachable", "unexpected", "smtp_error",
})
PROBE_EVERY = 5.0
RATE_PAUSE_MIN = 15.0
RATE_PAUSE_MAX = 600.0
# A connection holding one of a relay's shared slots (max_connections) is closed after
# this long idle, so that another worker can have the slot; reuse within a burst is
# unaffected.
SHARED_IDLE = 2.0
# Longest pause between two asks for a free connection slot.
SLOT_POLL_MAX = 0.5


class RelayPool:
    """Open connections per relay, reused across messages, at most ``concurrency`` each.

    With ``limits`` and a relay's ``max_connections``, each connection also holds one of
    the relay's slots shared by every worker (a lease in the store, one round trip per
    connection, not per message): without a free slot the e-mail waits up to
    ``limits.wait_at_most`` seconds, then is deferred (``relay_limit``, not an attempt).
    Such a connection is closed after ``shared_idle`` seconds idle to give its slot back,
    and after an e-mail when another worker waits for a slot for another establishment
    (``SharedLimits.hand_round``), so the slots go round the establishments.

    With ``limits``, the relay's failing state is shared too: the first failure of a run
    and the relay's return are written to the store, and ``failing_since()`` (what the
    failover and the alerts look at) is what every worker saw, at most a second old.

    A relay whose connection attempt fails is marked down for ``down_for`` seconds: the
    messages already waiting for it are deferred at once with the same explanation instead
    of each waiting out its own timeout (what Postfix calls a dead destination). The window
    is short so that a retry asked for after the relay is fixed really tries, and it ends
    at once when the relay's settings change.
    """

    def __init__(
        self,
        *,
        concurrency: int = 4,
        idle_timeout: float = 30.0,
        down_for: float = 2.0,
        local_hostname: str | None = None,
        rate_pause: float = RATE_PAUSE_MIN,
        limits: SharedLimits | None = None,
        shared_idle: float = SHARED_IDLE,
    ) -> None:
        self.rate_pause = rate_pause
        self.shared_idle = shared_idle
        self._background: set[asyncio.Task[None]] = set()
        # The relays' limits and pauses shared with the other workers through the store;
        # without it (the workstation's outbox), this process paces on its own.
        self.limits = limits
        self.concurrency = concurrency
        self.idle_timeout = idle_timeout
        self.down_for = down_for
        self.local_hostname = local_hostname
        self._relays: dict[tuple[Any, ...], _RelayState] = {}
        self._probes: set[asyncio.Task[None]] = set()

    def _state(self, relay: RelaySettings) -> _RelayState:
        key = relay.key()
        state = self._relays.get(key)
        if state is None:
            state = self._relays[key] = _RelayState(self.concurrency, self.rate_pause)
        return state

    async def send(
        self,
        relay: RelaySettings,
        envelope_from: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        smtputf8: bool = False,
        priority: int = 0,
        establishment: int = 0,
        limit: float | None = None,
        still_ours: Callable[[], bool] | None = None,
        settle: Settle | None = None,
    ) -> TransactionResult:
        """Deliver one message. ``limit`` bounds the conversation itself — not the wait
        for a free connection or for the relay's pace, which are Postier's own doing.
        The relay's connections go to the ``establishment``s sending through it in turn.
        ``still_ours`` is asked once the turn has come: a message whose lease was lost
        meanwhile is not sent (:class:`LeaseLost`). ``settle`` is given the relay's
        answer, and awaited once the e-mail's turn is given to the next one; the
        connection's next e-mail does not reach the relay before it ends (see
        :data:`Settle`)."""
        state = self._state(relay)
        await state.slots.acquire(priority, establishment)
        # A shared connection slot taken for this e-mail and not yet given to a connection.
        spare: list[ConnectionLease] = []
        try:
            if self.limits is None:
                await state.pace(relay.max_per_minute)
            else:
                try:
                    pause = await self.limits.admit(relay, len(recipients))
                    if self._shared(relay) and not state.idle:
                        # Waiting for a slot is Postier's doing: not within ``limit``.
                        lease = await self._take_slot(state, relay, establishment)
                        if lease is not None:
                            spare.append(lease)
                except DeliveryError as err:  # over a limit until later: deferred to then
                    return same_for_all(recipients, err, reusable=False)
                if pause is not None:
                    state.shared_pause(pause)
            if still_ours is not None and not still_ours():
                raise LeaseLost()
            async with asyncio.timeout(limit):
                result, settled = await self._send(
                    state, relay, envelope_from, recipients, data, smtputf8, spare, settle,
                    establishment)
        finally:
            state.slots.release()
            for lease in spare:
                self._release_later(state, lease)
        if settled is not None:
            await settled
        return result

    async def _send(
        self,
        state: _RelayState,
        relay: RelaySettings,
        envelope_from: str,
        recipients: Sequence[str],
        data: bytes,
        smtputf8: bool,
        spare: list[ConnectionLease],
        settle: Settle | None,
        establishment: int = 0,
    ) -> tuple[TransactionResult, asyncio.Future[None] | None]:
        """One conversation, and the recording of its result when ``settle`` is given (a
        task: the caller awaits it once the e-mail's slot is free)."""
        for attempt in range(2):
            now = time.monotonic()
            if (state.down_error is not None and now < state.down_until
                    and state.down_with == relay):
                return same_for_all(recipients, state.down_error, reusable=False), None
            if state.pause_error is not None and now < state.paused_until:
                # The relay asked to slow down: wait here without knocking on its door.
                return same_for_all(recipients, state.pause_error, reusable=False), None
            try:
                smtp, lease, reused = await self._checkout(state, relay, spare,
                                                           establishment)
            except DeliveryError as err:  # no connection slot came free in time
                return same_for_all(recipients, err, reusable=False), None
            if smtp is None:
                assert state.down_error is not None
                return same_for_all(recipients, state.down_error, reusable=False), None
            try:
                result = await send_on(
                    smtp, relay, envelope_from, recipients, data, smtputf8=smtputf8
                )
            except BaseException:
                # Cancelled (shutdown, whole-delivery timeout): the conversation is in
                # an unknown state, so the connection cannot be reused.
                smtp.close()
                self._release_later(state, lease)
                raise
            if result.error is not None and result.error.code == "rate_limited":
                await self._slowed_down(state, relay, result.error)
            elif any(r.status == "sent" for r in result.recipients):
                state.went_through()
                if self.limits is not None:
                    await self.limits.went_through(relay)
            if result.error is not None and result.error.smtp_code is None:
                await self._failed(state, relay, result.error)
            else:
                await self._answered(state, relay)  # it replied: whatever it said, it is up
            reuse = result.reusable and smtp.is_connected and self._lease_ok(lease)
            handed = reuse and await self._hand_round(relay, lease, establishment)
            reuse = reuse and not handed
            # A reused connection the server had quietly closed: one fresh try.
            again = not reuse and reused and attempt == 0 and _nothing_happened(result)
            # The result is recorded while the connection may already carry the next
            # e-mail's envelope; that e-mail's content waits for it (RelaySession.content).
            settled = (None if again or settle is None
                       else asyncio.ensure_future(settle(result)))
            if reuse and smtp.is_connected and self._lease_ok(lease):
                smtp.unsettled = settled
                self._put_idle(state, _Idle(smtp, time.monotonic(), lease))
            else:
                smtp.close()
                self._release_later(state, lease, handed_round=handed)
                if again:
                    continue
            return result, settled
        raise AssertionError("unreachable")

    async def _checkout(
        self, state: _RelayState, relay: RelaySettings, spare: list[ConnectionLease],
        establishment: int = 0,
    ) -> tuple[RelaySession | None, ConnectionLease | None, bool]:
        """An idle connection, or a new one (holding a shared slot taken beforehand in
        ``spare``, or now). Raises ``relay_limit`` when no slot came free in time."""
        while True:
            while state.idle:
                idle = state.idle.pop()
                if (idle.smtp.is_connected and self._lease_ok(idle.lease)
                        and time.monotonic() - idle.since < self.idle_timeout):
                    for unused in spare:
                        self._release_later(state, unused)
                    spare.clear()
                    return idle.smtp, idle.lease, True
                idle.smtp.close()
                self._release_later(state, idle.lease)
            lease: ConnectionLease | None = None
            if self._shared(relay):
                lease = spare.pop() if spare else await self._take_slot(state, relay,
                                                                        establishment)
                if lease is None:
                    continue  # a connection of this process became idle meanwhile
            break
        try:
            smtp = await open_session(relay, local_hostname=self.local_hostname)
        except BaseException as exc:
            self._release_later(state, lease)
            if not isinstance(exc, DeliveryError):
                raise
            err = exc
            state.down_error = err
            state.down_until = time.monotonic() + self.down_for
            state.down_with = relay
            if err.code == "rate_limited":
                await self._slowed_down(state, relay, err)
            else:
                await self._failed(state, relay, err)
            return None, None, False
        state.down_error = None
        return smtp, lease, False

    # -- the relay's connection slots shared by every worker (max_connections) -----------

    def _shared(self, relay: RelaySettings) -> bool:
        return self.limits is not None and relay.max_connections is not None

    def _lease_ok(self, lease: ConnectionLease | None) -> bool:
        return lease is None or (self.limits is not None and lease.usable(self.limits.clock()))

    async def _take_slot(
        self, state: _RelayState, relay: RelaySettings, establishment: int = 0
    ) -> ConnectionLease | None:
        """A free connection slot of the relay among every worker's for an e-mail of
        ``establishment``, waiting in line for one up to ``limits.wait_at_most`` seconds;
        None when a connection of this process became idle meanwhile (use it instead)."""
        assert self.limits is not None
        deadline = time.monotonic() + self.limits.wait_at_most
        delay = 0.05
        while True:
            if state.idle:
                return None
            lease = await self.limits.take_connection(relay, establishment)
            if lease is not None:
                return lease
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.limits.connections_full(relay)
            # Ask again soon, or at once when this process frees a connection or a slot.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.freed.wait(), min(delay, left))
            delay = min(delay * 2, SLOT_POLL_MAX)

    def _put_idle(self, state: _RelayState, idle: _Idle) -> None:
        state.idle.append(idle)
        state.signal_freed()
        if idle.lease is not None:
            # Give the slot back if nothing of this process needs the connection soon.
            asyncio.get_running_loop().call_later(self.shared_idle, self._reap, state)

    def _reap(self, state: _RelayState) -> None:
        now = time.monotonic()
        if any(i.lease is not None and now - i.since >= self.shared_idle - 0.01
               for i in state.idle):
            self._spawn(self._close_state_idle(state, self.shared_idle, leased_only=True))

    async def _hand_round(self, relay: RelaySettings, lease: ConnectionLease | None,
                          establishment: int) -> bool:
        """Whether to give the connection's slot back after this e-mail, for the other
        workers waiting for it (see ``SharedLimits.hand_round``)."""
        if lease is None or self.limits is None:
            return False
        return await self.limits.hand_round(relay, lease, establishment)

    async def _release(self, state: _RelayState, lease: ConnectionLease,
                       handed_round: bool = False) -> None:
        assert self.limits is not None
        try:
            await self.limits.release_connection(lease, handed_round=handed_round)
        except Exception as exc:
            # Not given back: the slot lapses with its lease instead.
            log.warning("could not give back a connection slot of a relay: %s", exc)
        state.signal_freed()

    def _release_later(self, state: _RelayState, lease: ConnectionLease | None, *,
                       handed_round: bool = False) -> None:
        if lease is not None and not lease.released:
            self._spawn(self._release(state, lease, handed_round))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _slowed_down(
        self, state: _RelayState, relay: RelaySettings, err: DeliveryError
    ) -> None:
        state.slowed_down(err)
        if self.limits is not None:
            # Every worker pauses, not only the one that was told.
            state.shared_pause(await self.limits.slowed_down(
                relay, err, self.rate_pause, RATE_PAUSE_MAX))

    # -- the relay's failing state, shared by every worker (failover, alerts) -------------

    async def _failed(self, state: _RelayState, relay: RelaySettings,
                      err: DeliveryError) -> None:
        """The relay failed: told to every worker unless they know it fails already (a
        write at the first failure of a run, not at each)."""
        state.failed(err)
        if self.limits is None or state.failing_since is None:
            return
        try:
            if (await self.limits.health(relay)).failing_since is None:
                await self.limits.relay_failing(relay)
        except Exception as exc:  # told at its next failure
            log.warning("could not share that a relay fails: %s", exc)

    async def _answered(self, state: _RelayState, relay: RelaySettings) -> None:
        """The relay answered: no longer failing, for every worker (a write only when it
        was failing as they saw it)."""
        state.answered()
        if self.limits is None:
            return
        try:
            await self.limits.relay_answered(relay)
        except Exception as exc:
            log.warning("could not share that a relay answers again: %s", exc)

    async def failing_since(self, relay: RelaySettings) -> float | None:
        """Since when (wall clock) the relay has kept failing, as any worker saw it (as
        this process did, without shared limits); None while it answers. At most a
        second old: no round trip per e-mail."""
        if self.limits is not None:
            return (await self.limits.health(relay)).failing_since
        state = self._relays.get(relay.key())
        if state is None or state.failing_since is None:
            return None
        return time.time() - (time.monotonic() - state.failing_since)

    async def known(self, relay: RelaySettings) -> bool:
        """Whether the relay's state means something: this process talked to it, or a
        worker saw it fail or come back (without that, "not failing" says nothing of it:
        the alerts need the difference)."""
        if self.tried(relay):
            return True
        if self.limits is None:
            return False
        health = await self.limits.health(relay)
        return health.failing_since is not None or health.recovered_at is not None

    def failing_for(self, relay: RelaySettings) -> float:
        """Seconds the relay has kept failing as this process saw it (0 when it
        answers)."""
        state = self._relays.get(relay.key())
        if state is None or state.failing_since is None:
            return 0.0
        return time.monotonic() - state.failing_since

    def tried(self, relay: RelaySettings) -> bool:
        """Whether this process has talked (or tried to talk) to the relay: without that,
        ``failing_for()`` = 0 says nothing about it (the alerts need the difference)."""
        return relay.key() in self._relays

    def probe_later(self, relay: RelaySettings) -> None:
        """While the backup relay stands in, check in the background whether the main one
        answers again (connection, TLS, greeting, authentication; nothing is sent). With
        shared limits, one worker probes for all every ``PROBE_EVERY`` seconds, and its
        answer brings every worker back."""
        state = self._state(relay)
        now = time.monotonic()
        if now - state.last_probe < PROBE_EVERY:
            return
        state.last_probe = now
        task = asyncio.get_running_loop().create_task(self._probe(state, relay))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, state: _RelayState, relay: RelaySettings) -> None:
        lease = None
        if self.limits is not None:
            try:
                if not await self.limits.probe_turn(relay, PROBE_EVERY * 0.9):
                    return  # another worker probes it now
                if self._shared(relay):
                    lease = await self.limits.take_connection(relay, queue=False)
                    if lease is None:
                        return  # every slot is in use: the next probe will see
            except Exception as exc:
                log.warning("could not probe a relay: %s", exc)
                return
        try:
            try:
                smtp = await open_smtp(relay, local_hostname=self.local_hostname)
            except DeliveryError:
                return
            state.down_error = None
            await self._answered(state, relay)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(smtp.quit(), 2)
            smtp.close()
        finally:
            if lease is not None:
                await self._release(state, lease)

    async def close_idle(self, older_than: float | None = None) -> None:
        """Close the connections idle for ``older_than`` seconds (the idle timeout), then
        renew the shared connection slots of those still open (the worker's heartbeat
        calls this)."""
        limit = self.idle_timeout if older_than is None else older_than
        for state in list(self._relays.values()):
            await self._close_state_idle(state, limit)
        if self.limits is not None:
            await self.limits.renew_connections()

    async def _close_state_idle(
        self, state: _RelayState, older_than: float, *, leased_only: bool = False
    ) -> None:
        now = time.monotonic()
        keep: list[_Idle] = []
        done: list[_Idle] = []
        for idle in state.idle:
            if leased_only and idle.lease is None:
                keep.append(idle)
            elif (now - idle.since >= older_than - 0.01 or not idle.smtp.is_connected
                    or not self._lease_ok(idle.lease)):
                done.append(idle)
            else:
                keep.append(idle)
        state.idle = keep
        for idle in done:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(idle.smtp.quit(), 2)
            idle.smtp.close()
            if idle.lease is not None:
                await self._release(state, idle.lease)

    async def close(self) -> None:
        await self.close_idle(older_than=0)
        while pending := [t for t in self._background if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)


def _nothing_happened(result: TransactionResult) -> bool:
    return (
        result.error is not None
        and result.error.smtp_code is None
        and result.error.step in ("mail_from", "rcpt_to")
        and all(r.status == "deferred" for r in result.recipients)
    )
