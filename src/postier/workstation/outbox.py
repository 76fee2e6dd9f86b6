"""The workstation's local outbox: nothing a teacher sends is lost on the way out.

One local SQLite queue (the server's own store and schema) holds the e-mails that could not
leave yet, whichever way they go:

- ``own`` and ``profile`` modes (:data:`DIRECT`): an e-mail is built exactly as the server
  builds it, stored first, then sent at once with the same delivery code as the server. A
  transient failure (relay down, timeout) leaves it here with its reason; recipients that
  already accepted it are never sent it twice.
- ``server`` mode (:data:`TO_SERVER`): an e-mail goes straight to the Postier server; only
  when the server cannot take it now (unreachable, timeout, ``429``, ``5xx``) is it kept
  here, as the request it was (JSON), with the idempotency key it was first sent with. It
  is handed over again with that key, so the server stores it once even when an earlier
  answer was lost. A refusal (``4xx``) is never kept: it is said at once.

In the queue, the establishment column names the way out (:data:`DIRECT` or
:data:`TO_SERVER`), so each way claims only its own e-mails. The outbox empties itself:
:func:`hand_over` at the next ``postier`` command (quick and bounded), :func:`watch` in a
loop (``postier outbox watch``, :class:`postier.OutboxFlusher`, or an asyncio task),
:func:`flush` on demand (``postier.flush_outbox()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
from sqlalchemy import insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from postier.core.message import MessageIn, build_message, make_message_id
from postier.core.policy import SenderDecision
from postier.core.queue_entry import queued
from postier.core.settings import DeliverySettings
from postier.delivery.attempt import deliver_one
from postier.delivery.pool import RelayPool
from postier.errors import AuthenticationRequired, InvalidInput, PostierError, load
from postier.i18n import N_
from postier.store import create_store, database_url
from postier.store import schema as t
from postier.store.base import (
    DEFERRED,
    FAILED,
    QUEUED,
    SENT,
    AttemptRecord,
    Claimed,
    MessageRecord,
    NewMessage,
    Outcome,
    Store,
)
from postier.store.sql import SQLStore
from postier.workstation.client import Recipient, SendResult, Submission, client_for
from postier.workstation.settings_file import Mode, WorkstationSettings, outbox_dir
from postier.workstation.settings_file import load as load_settings

WORKSTATION_USER = 0
DIRECT = 1  # sent with this workstation's own or profile SMTP settings
TO_SERVER = 2  # handed to the Postier server (server mode)

# The quick attempt at the start of a command: a server that does not answer within these
# makes the command wait no longer; what is left goes at the next one.
QUICK_BUDGET = 4.0
QUICK_TIMEOUT = httpx.Timeout(5.0, connect=1.5)
HAND_OVER_LEASE = 120.0

Report = Callable[[SendResult], None]


def exists() -> bool:
    """Whether this workstation has an outbox at all (nothing is created to find out)."""
    return (outbox_dir() / "postier.db").exists()


@contextlib.asynccontextmanager
async def open_outbox() -> AsyncIterator[Store]:
    directory = outbox_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = create_store(database_url(directory))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


# -- direct sending (own, profile) ------------------------------------------------------------


def _delivery_settings(settings: WorkstationSettings) -> DeliverySettings:
    return DeliverySettings(relay=settings.smtp)


def _decision(settings: WorkstationSettings, msg: MessageIn) -> SenderDecision:
    # With its own SMTP account a workstation sends as itself; the relay is the judge.
    address = msg.from_ or settings.identity.address
    name = settings.identity.name if address == settings.identity.address else ""
    return SenderDecision(
        from_name=name, from_address=address, reply_to=tuple(msg.reply_to),
        envelope_from=address, rule="inside_allowed", user_address=address,
        matched_pattern=None, allowed_domains=(),
    )


def _result(record: MessageRecord) -> SendResult:
    status = {QUEUED: "kept", DEFERRED: "kept"}.get(record.status, record.status)
    error: PostierError | None = None
    if record.last_error:
        error = load(json.loads(record.last_error))
    return SendResult(
        status, record.id, error,
        [Recipient(r.address, r.status, r.code, r.reply) for r in record.recipients],
        via="smtp",
    )


async def send_direct(
    settings: WorkstationSettings, payload: dict[str, Any], lang: str
) -> SendResult:
    """Store the e-mail in the outbox, then deliver what is due (this one first)."""
    msg = MessageIn.model_validate(payload)
    decision = _decision(settings, msg)
    built = build_message(
        msg, decision,
        message_id=make_message_id(settings.identity.address.rpartition("@")[2] or "localhost"),
    )
    async with open_outbox() as store:
        (res,) = await store.enqueue([
            queued(built, decision.formatted_from, establishment_id=DIRECT,
                   user_id=WORKSTATION_USER, idempotency_key=msg.idempotency_key)
        ])
        await _deliver_due(store, settings)
        record = await store.get_message(res.id)
        assert record is not None
        return _result(record)


async def _deliver_due(store: Store, settings: WorkstationSettings) -> list[str]:
    """Send every due direct e-mail; returns their ids."""
    worker = f"workstation-{uuid.uuid4().hex[:8]}"
    delivery = _delivery_settings(settings)
    pool = RelayPool(concurrency=2, down_for=0)
    done: list[str] = []
    try:
        while True:
            claimed = await store.claim(worker, 20, lease_seconds=600, now=time.time(),
                                        skip_establishments=(TO_SERVER,))
            if not claimed:
                return done
            outcomes = [await deliver_one(c, delivery, pool) for c in claimed]
            await store.record_outcomes(worker, outcomes)
            done += [c.id for c in claimed]
    finally:
        await store.release_worker(worker)
        await pool.close()


async def _flush_direct(store: Store, settings: WorkstationSettings) -> list[SendResult]:
    waiting = await store.list_messages(establishment_id=DIRECT, limit=10_000)
    now = time.time()
    ids = [m.id for m in waiting if m.status in (QUEUED, DEFERRED)]
    for mid in ids:
        await store.set_status(mid, QUEUED, from_statuses=(QUEUED, DEFERRED), now=now,
                               next_attempt_at=now)
    await _deliver_due(store, settings)
    return await _results(store, ids)


async def _results(store: Store, ids: Sequence[str]) -> list[SendResult]:
    out = []
    for mid in ids:
        record = await store.get_message(mid)
        if record is not None:
            out.append(_result(record))
    return out


# -- through the Postier server (server mode) -------------------------------------------------


def _recipients(payload: dict[str, Any]) -> list[str]:
    return [str(a) for key in ("to", "cc", "bcc") for a in payload.get(key) or ()]


async def keep_for_server(
    settings: WorkstationSettings, payload: dict[str, Any], error: PostierError,
    started: float,
) -> SendResult:
    """Keep an e-mail the server could not take (``error``, transient) until it can."""
    data = json.dumps(payload, ensure_ascii=False).encode()
    sender = str(payload.get("from") or settings.identity.address or "")
    async with open_outbox() as store:
        (res,) = await store.enqueue([NewMessage(
            id=uuid.uuid4().hex, establishment_id=TO_SERVER, user_id=WORKSTATION_USER,
            priority=0, envelope_from=sender, header_from=sender, message_id="",
            subject=str(payload.get("subject") or ""), data=data,
            recipients=_recipients(payload),
            idempotency_key=str(payload["idempotency_key"]),
        )])
        if not res.duplicate:
            await _record_first_attempt(store, res.id, settings.server.url, error, started)
    return SendResult("kept", res.id, error, via="server")


async def _record_first_attempt(
    store: Store, message_id: str, url: str, error: PostierError, started: float
) -> None:
    """The attempt made before the e-mail was kept, as if the outbox had made it."""
    if not isinstance(store, SQLStore):  # pragma: no cover - the outbox is SQLite
        return
    now = time.time()

    async def job(conn: AsyncConnection) -> None:
        await conn.execute(
            update(t.messages).where(t.messages.c.id == message_id)
            .values(status=DEFERRED, attempts=1, last_error=json.dumps(error.dump()),
                    next_attempt_at=now, updated_at=now))
        await conn.execute(insert(t.attempts).values(
            message_id=message_id, started_at=started,
            duration_ms=int((now - started) * 1000), relay=url, outcome="deferred",
            code=getattr(error, "http_status", None), detail=error.message("en")))

    await store.write(job)


def _submit(settings: WorkstationSettings, payload: dict[str, Any], lang: str | None,
            timeout: float | httpx.Timeout) -> Submission:
    with client_for(settings, lang, timeout=timeout) as c:
        return c.submit_message(payload)


def _handed(claimed: Claimed, url: str, started: float, submission: Submission) -> Outcome:
    return Outcome(
        claimed.id, SENT, claimed.attempts + 1, time.time(), None, [],
        AttemptRecord(started, int((time.time() - started) * 1000), url, SENT, 202,
                      submission.id),
    )


def _not_handed(claimed: Claimed, url: str, started: float, error: PostierError,
                keep: bool) -> Outcome:
    return Outcome(
        claimed.id, DEFERRED if keep else FAILED, claimed.attempts + 1, time.time(),
        json.dumps(error.dump()), [],
        AttemptRecord(started, int((time.time() - started) * 1000), url,
                      DEFERRED if keep else FAILED, getattr(error, "http_status", None),
                      error.message("en")),
    )


def _payload(claimed: Claimed) -> dict[str, Any]:
    try:
        payload = json.loads(claimed.data)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise InvalidInput(N_("This kept e-mail is damaged and cannot be handed over."))
    return payload


def _keeps(error: PostierError) -> bool:
    """Whether a kept e-mail waits for another try after ``error``: the server could not
    take it now, or it does not know this workstation's token (fixed in the settings, the
    e-mails kept so far still go)."""
    return error.transient or isinstance(error, AuthenticationRequired)


async def _hand_over_one(
    store: Store, worker: str, claimed: Claimed, settings: WorkstationSettings,
    lang: str | None, http_timeout: float | httpx.Timeout,
) -> SendResult:
    url = settings.server.url
    started = time.time()
    try:
        payload = _payload(claimed)
        sub = await asyncio.to_thread(_submit, settings, payload, lang, http_timeout)
    except PostierError as exc:
        keep = _keeps(exc)
        await store.record_outcomes(worker, [_not_handed(claimed, url, started, exc, keep)])
        return SendResult("kept" if keep else "failed", claimed.id, exc, via="server")
    await store.record_outcomes(worker, [_handed(claimed, url, started, sub)])
    return SendResult(sub.status, sub.id, sender_note=sub.sender_note, via="server",
                      kept_as=claimed.id)


async def hand_over(
    settings: WorkstationSettings, *, lang: str | None = None, quick: bool = False,
) -> list[SendResult]:
    """Hand the kept e-mails to the server, oldest first, each with its idempotency key;
    stops at the first one the server cannot take now (it is away: the others would wait
    as long). ``quick``: short timeouts and a few seconds in all, for the start of a
    command."""
    if not (settings.server.url and settings.server.token) or not exists():
        return []
    timeout: float | httpx.Timeout = QUICK_TIMEOUT if quick else 30.0
    deadline = time.monotonic() + (QUICK_BUDGET if quick else float("inf"))
    worker = f"workstation-{uuid.uuid4().hex[:8]}"
    results: list[SendResult] = []
    async with open_outbox() as store:
        await store.release_expired_leases(time.time())
        try:
            while time.monotonic() < deadline:
                claimed = await store.claim(worker, 1, HAND_OVER_LEASE, time.time(),
                                            skip_establishments=(DIRECT,))
                if not claimed:
                    break
                result = await _hand_over_one(store, worker, claimed[0], settings, lang,
                                              timeout)
                results.append(result)
                if result.status == "kept":
                    break
        finally:
            await store.release_worker(worker)
    return results


# -- emptying the outbox ----------------------------------------------------------------------


async def flush(settings: WorkstationSettings, lang: str | None = None) -> list[SendResult]:
    """Try every waiting e-mail now; returns what became of each."""
    results = await hand_over(settings, lang=lang)
    if settings.mode != Mode.SERVER:
        async with open_outbox() as store:
            results += await _flush_direct(store, settings)
    return results


async def _pass(settings: WorkstationSettings, lang: str | None) -> list[SendResult]:
    """One round of :func:`watch`: kept e-mails for the server, then due direct ones."""
    results = await hand_over(settings, lang=lang)
    if settings.mode == Mode.SERVER or not exists():
        return results
    try:
        settings.check_ready()
    except PostierError:
        return results  # incomplete SMTP settings: the kept e-mails wait for them
    async with open_outbox() as store:
        return results + await _results(store, await _deliver_due(store, settings))


async def watch(
    settings: WorkstationSettings | None = None,
    *,
    interval: float = 15.0,
    stop: asyncio.Event | None = None,
    report: Report | None = None,
    lang: str | None = None,
) -> None:
    """Empty the outbox as soon as the way out answers, until ``stop`` is set (or the task
    is cancelled): every ``interval`` seconds, the kept e-mails go to the server and the
    direct ones due for a retry to the relay. Without ``settings`` the workstation's file
    is read again at each round, so a corrected token or relay is used at once. Each
    e-mail that left or was refused is passed to ``report``.

    >>> task = asyncio.create_task(postier.workstation.outbox.watch(interval=30))
    """
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            current = settings or load_settings()
            for result in await _pass(current, lang):
                if report is not None and result.status != "kept":
                    report(result)
        except PostierError:
            pass  # an unreadable settings file or a busy outbox: the next round tries again
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


# -- reading ----------------------------------------------------------------------------------


async def listing(limit: int = 100) -> list[MessageRecord]:
    """Every e-mail of the outbox, newest first, both ways out together."""
    async with open_outbox() as store:
        rows = [m for way in (DIRECT, TO_SERVER)
                for m in await store.list_messages(establishment_id=way, limit=limit)]
    return sorted(rows, key=lambda m: m.created_at, reverse=True)[:limit]


async def get(message_id: str) -> MessageRecord | None:
    async with open_outbox() as store:
        return await store.get_message(message_id)


def handed_as(record: MessageRecord) -> str | None:
    """The server's id of a kept e-mail that was handed over, else None."""
    if record.establishment_id != TO_SERVER or record.status != SENT:
        return None
    return next((a.detail for a in reversed(record.history) if a.outcome == SENT), None)
