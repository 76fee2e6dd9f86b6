"""The delivery worker: claims due messages under a lease and sends them through the relay.

One worker runs many deliveries at once (bounded by ``max_in_flight`` and by the relay
pool's per-relay concurrency), each one attempt of :func:`~postier.delivery.attempt.deliver_one`.
Leases are short and renewed four times per lease (the worker's heartbeat) however long a
delivery runs; a worker that dies stops renewing and its messages return to the queue one
lease after its death, to be sent by another. Results are written back per recipient, so a
retry only goes to the recipients that have no final answer yet.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from postier.core.outage import Outage
from postier.core.settings import DeliverySettings
from postier.core.supervision import Supervisor
from postier.delivery.attempt import Signer, deliver_one
from postier.delivery.pool import LeaseLost, RelayPool
from postier.errors import PostierError
from postier.store.base import DEFERRED, FAILED, SENT, Claimed, Outcome, Store

__all__ = ["DeliveryWorker", "SettingsFor"]

log = logging.getLogger("postier.delivery")

SettingsFor = Callable[[int], Awaitable[DeliverySettings]]


class DeliveryWorker:
    def __init__(
        self,
        store: Store,
        settings_for: SettingsFor,
        *,
        pool: RelayPool,
        worker_id: str | None = None,
        claim_batch: int = 64,
        max_in_flight: int = 256,
        max_in_flight_per_establishment: int | None = None,
        lease_seconds: float = 20.0,
        poll_interval: float = 1.0,
        claim_gather: float = 0.005,
        on_failure: Callable[[str], Awaitable[object]] | None = None,
        on_delay: Callable[[str], Awaitable[object]] | None = None,
        sign: Signer | None = None,
        on_sent: Callable[[str, int], Awaitable[object]] | None = None,
    ) -> None:
        # on_sent(message id, establishment id): the webhook's message.sent.
        self.on_sent = on_sent
        self.sign = sign
        self.store = store
        self.settings_for = settings_for
        self.pool = pool
        self.worker_id = worker_id or f"w-{uuid.uuid4().hex[:12]}"
        self.claim_batch = claim_batch
        self.max_in_flight = max_in_flight
        # One establishment whose relay stalls must not take every slot: past this many
        # of its e-mails in flight, claims skip it and take the others'.
        self.max_in_flight_per_establishment = (
            max_in_flight_per_establishment or max(1, max_in_flight // 2)
        )
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.claim_gather = claim_gather
        self.on_failure = on_failure
        self.on_delay = on_delay
        self._wake = asyncio.Event()
        self._held_back = False
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._in_flight_by_establishment: collections.Counter[int] = collections.Counter()
        self._lease_until: dict[str, float] = {}
        self._supervisor = Supervisor()
        # One log line when results cannot be written, not one per result.
        self._results_outage = Outage(f"worker {self.worker_id}: delivery results")
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.running = False

    def notify(self) -> None:
        """New work may be due (called by the doors after an acceptance)."""
        self._wake.set()

    async def start(self) -> None:
        # Messages left "sending" by a previous crash of this or another worker come back
        # as soon as their lease has expired.
        await self.store.release_expired_leases(time.time())
        self._stopping = False
        self._in_flight_by_establishment.clear()
        # Each loop outlives the store's errors; one that dies anyway is started again.
        self._supervisor.start("claims", self._claim_loop)
        self._supervisor.start("lease renewal", self._maintenance_loop)
        self._supervisor.start("idle connections", self._idle_loop)
        self._tasks = self._supervisor.tasks
        self.running = True
        log.info("delivery worker %s started", self.worker_id)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; let deliveries in flight finish for ``grace`` seconds, then
        return what is left to the queue."""
        self._stopping = True
        self._wake.set()
        await self._supervisor.stop()
        if self._in_flight:
            _, pending = await asyncio.wait(list(self._in_flight.values()), timeout=grace)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        returned = await self.store.release_worker(self.worker_id)
        if returned:
            log.info("returned %d unfinished deliveries to the queue", returned)
        await self.pool.close()
        self.running = False

    def problems(self) -> list[str]:
        """The loops of this worker that failed and are being started again."""
        return self._supervisor.problems()

    async def _record(self, claimed: Claimed, outcome: Outcome) -> None:
        # While the lease holds, nobody else takes the message: keep trying until then.
        await _retry_write(
            lambda: self.store.record_outcomes(self.worker_id, [outcome]),
            self._lease_until.get(claimed.id, time.time() + self.lease_seconds),
            self._results_outage,
        )

    async def _claim_loop(self) -> None:
        outage = Outage(f"worker {self.worker_id}: claims")
        while not self._stopping:
            # Cleared before the claim: a wake-up that comes while it runs is not lost.
            self._wake.clear()
            free = self.max_in_flight - len(self._in_flight)
            want = min(free, self.claim_batch)
            claimed: list[Claimed] = []
            full = frozenset(
                est for est, n in self._in_flight_by_establishment.items()
                if n >= self.max_in_flight_per_establishment
            )
            # Whether slots held this claim back: only then is a slot freed by a finished
            # delivery worth a claim of its own (see _done).
            self._held_back = want < self.claim_batch or bool(full)
            if want > 0:
                try:
                    claimed_at = time.time()
                    # Full establishments cost the claim one index probe each: it takes
                    # every establishment's due e-mails in turn (Store.claim).
                    claimed = await self.store.claim(
                        self.worker_id, want, self.lease_seconds, claimed_at, full
                    )
                    for c in claimed:
                        self._lease_until[c.id] = claimed_at + self.lease_seconds
                    outage.worked()
                except Exception as exc:
                    # Whatever the store says (stopped, restarting, unreachable): wait a
                    # little and claim again, until it answers.
                    await outage.pause(exc)
                    continue
                for c in claimed:
                    task = asyncio.create_task(self._deliver(c), name=f"deliver-{c.id}")
                    self._in_flight[c.id] = task
                    self._in_flight_by_establishment[c.establishment_id] += 1
                    task.add_done_callback(self._done)
                if claimed and len(claimed) == want:
                    continue  # more may be due right now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            if self._in_flight and self.claim_gather > 0 and not self._stopping:
                # Busy already: a moment's wait lets one claim take the e-mails accepted
                # meanwhile, instead of one claim (a transaction) per wake-up.
                await asyncio.sleep(self.claim_gather)

    def _done(self, task: asyncio.Task[None]) -> None:
        name = task.get_name().removeprefix("deliver-")
        self._in_flight.pop(name, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())
        if self._held_back:
            # A slot is free, and the last claim took less than it could for want of
            # slots. Otherwise the queue had no more than was claimed, and new e-mails
            # wake the worker themselves: claiming after every delivery would cost a
            # database round trip per e-mail for nothing.
            self._wake.set()

    async def _maintenance_loop(self) -> None:
        # The worker's heartbeat: its leases are renewed four times per lease, so a live
        # worker keeps its e-mails however long a delivery takes, while a dead one's
        # expire one lease after its last renewal; the other workers look for expired
        # leases as often, and take those e-mails over.
        interval = max(0.5, self.lease_seconds / 4)
        outage = Outage(f"worker {self.worker_id}: lease renewal")
        wait = interval
        while True:
            await asyncio.sleep(wait)
            now = time.time()
            try:
                asked = list(self._in_flight)
                held = await self.store.renew_leases(
                    self.worker_id, asked, self.lease_seconds, now
                )
                # Only the leases this renewal asked for: an e-mail claimed while it ran
                # holds the lease of its claim (marking it lost left it to the queue).
                for mid in asked:
                    if mid in self._lease_until:
                        # A lease another worker took back is lost for good.
                        self._lease_until[mid] = (now + self.lease_seconds if mid in held
                                                  else 0.0)
                if await self.store.release_expired_leases(now):
                    self._wake.set()
            except Exception as exc:
                # Renew again as soon as the store answers: the leases run meanwhile.
                wait = outage.failed(exc)
                continue
            outage.worked()
            wait = interval

    async def _idle_loop(self) -> None:
        # Apart from the heartbeat: saying QUIT to a slow relay's idle connections (up to
        # a few seconds each) must never hold back the renewal of the leases.
        interval = max(0.5, self.lease_seconds / 4)
        outage = Outage(f"worker {self.worker_id}: idle connections")
        while True:
            await asyncio.sleep(interval)
            try:
                await self.pool.close_idle()
            except Exception as exc:
                await asyncio.sleep(outage.failed(exc))
                continue
            outage.worked()

    async def _deliver(self, claimed: Claimed) -> None:
        try:
            await self._deliver_held(claimed)
        finally:
            self._lease_until.pop(claimed.id, None)
            counts = self._in_flight_by_establishment
            counts[claimed.establishment_id] -= 1
            if counts[claimed.establishment_id] <= 0:
                del counts[claimed.establishment_id]

    async def _settings(self, claimed: Claimed) -> DeliverySettings | None:
        """The establishment's settings, waiting for the store while the lease holds; None
        once it is lost (the message is another worker's by then)."""
        outage = Outage(f"worker {self.worker_id}: settings of {claimed.id}")
        while True:
            try:
                settings = await self.settings_for(claimed.establishment_id)
            except Exception as exc:
                if time.time() >= self._lease_until.get(claimed.id, 0.0):
                    return None
                await outage.pause(exc)
                continue
            outage.worked()
            return settings

    async def _deliver_held(self, claimed: Claimed) -> None:
        settings = await self._settings(claimed)
        if settings is None:
            log.warning("lease on %s lost while the store was unavailable; leaving it to "
                        "the queue", claimed.id)
            return

        def still_ours() -> bool:
            # False when this worker was frozen or cut off from the database past its
            # lease: the message may already be another worker's; sending would repeat it.
            return time.time() < self._lease_until.get(claimed.id, 0.0)

        async def record(outcome: Outcome) -> None:
            await self._record(claimed, outcome)

        try:
            outcome = await deliver_one(claimed, settings, self.pool, self.sign, still_ours,
                                        record)
        except LeaseLost:
            log.warning("lease on %s lost before sending; leaving it to the queue",
                        claimed.id)
            return
        _log_outcome(claimed, outcome)
        try:
            if self.on_failure is not None and any(
                r.status == FAILED for r in outcome.recipients
            ):
                await self.on_failure(claimed.id)
            warn_after = settings.retry.delay_warning
            if (self.on_delay is not None and outcome.status == DEFERRED and warn_after
                    and time.time() - claimed.created_at >= warn_after):
                await self.on_delay(claimed.id)  # once: the notice has an idempotency key
            # message.sent goes only to a webhook: without one (the usual case), every
            # e-mail sent would pay the callback's own look-up of the same settings.
            if (self.on_sent is not None and outcome.status == SENT
                    and settings.alerts.webhook_url):
                await self.on_sent(claimed.id, claimed.establishment_id)
        except Exception:
            log.exception("could not tell the sender about %s", claimed.id)


async def _retry_write(write: Callable[[], Awaitable[None]], give_up_at: float,
                       outage: Outage) -> bool:
    """Write a result the relay already gave, trying again while the store is unavailable
    (disk full, database locked, stopped or restarting): dropping it would send the
    e-mail twice. Any error but a PostierError that says it is final is worth another try."""
    delay = 0.25
    while True:
        try:
            await write()
            outage.worked()
            return True
        except Exception as exc:
            final = isinstance(exc, PostierError) and not exc.transient
            if final or time.time() + delay >= give_up_at:
                log.error("could not record a delivery result: %s", exc)
                return False
            outage.failed(exc)  # logged once for every result waiting, not at every try
        await asyncio.sleep(delay)
        delay = min(delay * 2, 3.0)


def _log_outcome(claimed: Claimed, outcome: Outcome) -> None:
    detail = outcome.attempt.detail or ""
    if outcome.status == SENT:
        log.info("message %s sent (%s)", claimed.id, detail)
    elif outcome.status == FAILED:
        log.warning("message %s failed: %s", claimed.id, detail)
    else:
        log.info(
            "message %s deferred (attempt %d, next in %.0f s): %s",
            claimed.id,
            outcome.attempts,
            max(0.0, outcome.next_attempt_at - time.time()),
            detail,
        )
