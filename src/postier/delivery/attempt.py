"""One delivery attempt of a claimed e-mail, and what its answers make of the e-mail.

:func:`deliver_one` sends the e-mail through its relay (or the backup relay, or an
upstream Postier server) — what the server's workers and a workstation's outbox both do;
:func:`decide` turns the relay's answers into the e-mail's next state: sent, failed, or
tried again when :class:`~postier.delivery.retry.RetryPolicy` says, with the error the
sender and the administrator read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable

from postier.core.settings import DeliverySettings, RelayKind, RelaySettings
from postier.delivery.classify import classify
from postier.delivery.pool import LeaseLost, RelayPool
from postier.delivery.retry import RetryPolicy
from postier.delivery.transaction import RcptResult, TransactionResult
from postier.delivery.upstream import hand_on
from postier.errors import DeliveryError, PostierError, StoreUnavailable
from postier.i18n import N_
from postier.store.base import (
    DEFERRED,
    FAILED,
    SENT,
    AttemptRecord,
    Claimed,
    Outcome,
    RecipientState,
)

log = logging.getLogger("postier.delivery")

# Adds a DKIM signature to an establishment's e-mail (the same bytes without a key).
Signer = Callable[[int, bytes], Awaitable[bytes]]
# Deferrals that say nothing about the e-mail or its relay: they do not count as attempts.
NOT_AN_ATTEMPT = frozenset({"rate_limited", "relay_limit", "store_unavailable"})


def decide(
    claimed: Claimed,
    attempted: list[RecipientState],
    result: TransactionResult,
    retry: RetryPolicy,
    *,
    now: float,
    started_at: float,
    duration_ms: int,
    relay: str,
) -> Outcome:
    """Turn one attempt's per-recipient answers into the message's next state."""
    answers = {r.address: r for r in result.recipients}
    changed: list[RecipientState] = []
    states = {r.position: r for r in claimed.recipients}
    for rs in attempted:
        ans = answers.get(rs.address)
        if ans is None:
            continue
        new = RecipientState(rs.position, rs.address, ans.status, ans.code, ans.reply)
        states[rs.position] = new
        changed.append(new)
    attempts = claimed.attempts + 1
    error: PostierError | None = result.error
    if error is None:
        error = _refused_recipient(changed)
    waiting = [r for r in states.values() if r.status in ("pending", DEFERRED)]
    next_at = now
    status: str
    slow_down = result.error is not None and result.error.code in NOT_AN_ATTEMPT
    if slow_down and waiting and now < claimed.created_at + retry.max_age:
        # The relay asked to slow down, its sending limit is reached until a given time,
        # or the database the limits are counted in is away: not a failure of this
        # e-mail. It waits without the attempt counting towards its backoff.
        attempts = claimed.attempts
        assert result.error is not None
        resume = result.error.params.get("resume_at")
        wait_until = resume if isinstance(resume, float) else now + retry.first_delay
        next_at = min(wait_until, claimed.created_at + retry.max_age)
    elif waiting:
        nxt = retry.next_attempt(attempts, claimed.created_at, now)
        if nxt is None:
            changed, error = _give_up(waiting, states, changed, retry, error)
        else:
            next_at = nxt
    if not any(r.status in ("pending", DEFERRED) for r in states.values()):
        status = SENT if any(r.status == SENT for r in states.values()) else FAILED
    else:
        status = DEFERRED
    codes = [r.code for r in changed if r.code is not None]
    return Outcome(
        message_id=claimed.id,
        status=status,
        attempts=attempts,
        next_attempt_at=next_at,
        last_error=json.dumps(error.dump()) if error is not None else None,
        recipients=changed,
        attempt=AttemptRecord(
            started_at=started_at,
            duration_ms=duration_ms,
            relay=relay,
            outcome=status,
            code=(error.smtp_code if error is not None else None) or (codes[-1] if codes else None),
            detail=error.message("en") if error is not None else _summary(changed),
            reason=json.dumps(error.dump()) if error is not None else None,
        ),
    )


def _refused_recipient(changed: list[RecipientState]) -> DeliveryError | None:
    """The message's error when the transaction went through but a recipient was not
    sent: the first such recipient's refusal."""
    bad = [r for r in changed if r.status != SENT]
    if not bad:
        return None
    return DeliveryError(
        N_("The SMTP server refused {address}: {reply_code} {reply}"),
        hint=N_("Check the recipient's address.")
        if bad[0].status == FAILED
        else N_("Postier will try again later."),
        code="recipient_refused" if bad[0].status == FAILED else "smtp_error",
        address=bad[0].address,
        reply_code=bad[0].code,
        reply=bad[0].reply or "",
        smtp_code=bad[0].code,
        transient=bad[0].status != FAILED,
    )


def _give_up(
    waiting: list[RecipientState],
    states: dict[int, RecipientState],
    changed: list[RecipientState],
    retry: RetryPolicy,
    error: PostierError | None,
) -> tuple[list[RecipientState], PostierError]:
    """The message has been trying for ``retry.max_age``: its recipients still waiting
    fail (``states`` updated); the recipients changed and the message's error."""
    days = round(retry.max_age / 86400, 1)
    for r in waiting:
        expired = RecipientState(
            r.position,
            r.address,
            FAILED,
            r.code,
            f"gave up after {days:g} days of trying; last reply: {r.reply or '-'}",
        )
        states[r.position] = expired
        changed = [c for c in changed if c.position != r.position] + [expired]
    reason = error.message("en") if error else "no answer"
    return changed, PostierError(
        N_("Gave up after {days} days of trying: {reason}"),
        code="expired",
        hint=N_("Check the relay settings and the recipients' addresses, then send "
                "the e-mail again."),
        days=f"{days:g}",
        reason=reason,
    )


def _summary(changed: list[RecipientState]) -> str:
    return "; ".join(f"{r.address}: {r.code} {r.reply or ''}".strip() for r in changed)


async def deliver_one(
    claimed: Claimed,
    settings: DeliverySettings,
    pool: RelayPool,
    sign: Signer | None = None,
    still_ours: Callable[[], bool] | None = None,
    record: Callable[[Outcome], Awaitable[None]] | None = None,
) -> Outcome:
    """One delivery attempt of a claimed message through ``settings.relay``: what the
    server's workers and a workstation's outbox both do. ``sign`` may add a DKIM
    signature to the bytes (the stored message itself stays as accepted). ``record``
    stores the outcome: through the relay pool, before the connection may carry another
    e-mail, so a killed worker repeats at most one conversation per connection."""
    relay = settings.relay
    backup = settings.backup_relay
    if backup is not None and backup.configured and await _failed_over(pool, relay,
                                                                         settings):
        # The main relay has kept failing, as any worker saw it: the backup takes over,
        # for every worker, until a probe (any worker's) finds the main one answering.
        pool.probe_later(relay)
        relay = backup
    if sign is not None:
        try:
            signed = await sign(claimed.establishment_id, claimed.data)
            if signed is not claimed.data:  # the same bytes when there is no key
                claimed = dataclasses.replace(claimed, data=signed)
        except Exception:
            # An unsigned e-mail is better than none: deliver it and say why in the log.
            log.exception("DKIM signing of %s failed; sending it unsigned", claimed.id)
    attempted = [r for r in claimed.recipients if r.status in ("pending", DEFERRED)]
    started_at = time.time()
    t0 = time.perf_counter()
    # A bound on the whole conversation, beyond each command's own timeout, so a relay
    # that answers one byte at a time cannot hold a delivery forever.
    whole = relay.timeout * (6 + len(attempted)) + len(claimed.data) / 50_000
    recorded: list[Outcome] = []

    def outcome_of(result: TransactionResult) -> Outcome:
        return decide(claimed, attempted, result, _retry_policy(settings), now=time.time(),
                      started_at=started_at,
                      duration_ms=int((time.perf_counter() - t0) * 1000),
                      relay=relay.describe())

    async def settle(result: TransactionResult) -> None:
        recorded.append(outcome_of(result))
        if record is not None:
            await record(recorded[-1])

    try:
        if relay.kind == RelayKind.POSTIER:
            result = await asyncio.wait_for(
                hand_on(relay, claimed, [r.address for r in attempted]), whole)
        else:
            result = await pool.send(
                relay, claimed.envelope_from, [r.address for r in attempted], claimed.data,
                smtputf8=claimed.smtputf8, priority=claimed.priority,
                establishment=claimed.establishment_id, limit=whole, still_ours=still_ours,
                settle=settle)
    except LeaseLost:
        raise
    except Exception as exc:
        # Whatever went wrong, the message must not stay stuck "sending": it is deferred
        # with the reason, and the caller goes on.
        result = _deferred_by(exc, claimed, attempted, relay)
    if recorded:  # settled (and recorded) while the relay's connection was held
        return recorded[-1]
    await settle(result)
    return recorded[-1]


def _deferred_by(exc: Exception, claimed: Claimed, attempted: list[RecipientState],
                 relay: RelaySettings) -> TransactionResult:
    """Every recipient attempted deferred by a failure that is no answer of the relay's
    (logged unless it is a timeout or the store being away)."""
    if isinstance(exc, StoreUnavailable):  # the sending limits shared in the store
        log.warning("cannot deliver %s now: %s", claimed.id, exc)
        err = store_away()
    else:
        if not isinstance(exc, TimeoutError):
            log.exception("unexpected error delivering %s", claimed.id)
        err = classify(exc, "data", relay)
    return TransactionResult(
        [RcptResult(r.address, DEFERRED, None, err.reply or err.message())
         for r in attempted],
        error=err,
        reusable=False,
    )


async def _failed_over(pool: RelayPool, relay: RelaySettings,
                       settings: DeliverySettings) -> bool:
    since = await pool.failing_since(relay)
    return since is not None and time.time() - since >= settings.failover_after


def store_away() -> DeliveryError:
    """The relay was never reached: the store the sending limits are counted in is away."""
    return DeliveryError(
        N_("Not sent yet: the server's database is unavailable for a moment."),
        hint=N_("Nothing to do: Postier tries again as soon as its database answers."),
        code="store_unavailable", transient=True, step="connect",
    )


def _retry_policy(settings: DeliverySettings) -> RetryPolicy:
    r = settings.retry
    return _policy(r.first_delay, r.max_delay, r.max_age)


@functools.lru_cache(maxsize=64)
def _policy(first_delay: float, max_delay: float, max_age: float) -> RetryPolicy:
    """One policy object per set of values, not one per delivery."""
    return RetryPolicy(float(first_delay), float(max_delay), float(max_age))
