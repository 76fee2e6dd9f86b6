"""Bounces received, whichever way they come: the bounce SMTP door
(``postier serve --bounce-smtp``) and the establishments' IMAP mailboxes
(``bounces.imap``), read by :class:`BounceMailboxTask`.

:func:`receive` reads one report (:func:`postier.core.bounce_reports.parse_bounce`), finds
the e-mail its return address names (the SMTP envelope's recipient, or the report's own
To, Delivered-To... for a mailbox) and lets the service layer apply it
(:meth:`postier.core.bounces.Bounces.apply`); then the sender's notice (once per e-mail)
and the ``message.bounced`` webhook event. A report to no valid return address, an
auto-reply and anything unreadable change nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from postier.core.accounts import require_admin
from postier.core.aio import cancel_and_wait
from postier.core.bounce_reports import BounceReport, parse_bounce
from postier.core.bounces import Applied
from postier.core.outage import Outage
from postier.core.service import Postier
from postier.core.settings import BounceMailbox, DeliverySettings
from postier.errors import InvalidInput, StoreUnavailable
from postier.i18n import N_
from postier.ops.bounce_mailbox import MailboxError, check_mailbox, poll_mailbox
from postier.ops.webhook import message_event
from postier.store.base import MessageRecord, User

log = logging.getLogger("postier.bounces")

MAX_BOUNCE_SIZE = 10 * 1024 * 1024  # a bounce quotes the e-mail; attachments make it big
# Reports larger than this are read in a thread, so the event loop keeps answering.
_READ_INLINE = 256 * 1024
MAILBOX_ROUND = 30.0  # seconds between two looks at which mailboxes are due


@dataclass
class Received:
    """What one report did."""

    kind: str  # the report's kind (dsn, autoreply, complaint, unknown), or "not_ours"
    message_id: str | None = None
    applied: list[Applied] = field(default_factory=list)


async def read_report(data: bytes) -> BounceReport:
    if len(data) > _READ_INLINE:
        return await asyncio.to_thread(parse_bounce, data)
    return parse_bounce(data)


async def find_message(core: Postier, addresses: Sequence[str],
                       establishment_id: int | None = None) -> MessageRecord | None:
    """The e-mail the first valid return address among ``addresses`` names (of that
    establishment, when one is given: a mailbox never acts on another's e-mails)."""
    for address in dict.fromkeys(a.lower() for a in addresses):
        record = await core.bounces.accepts(address)
        if record is not None and establishment_id in (None, record.establishment_id):
            return record
    return None


async def receive(core: Postier, data: bytes, envelope_recipients: Sequence[str] = (),
                  *, establishment_id: int | None = None) -> Received:
    """Apply one bounce received (see the module's docstring)."""
    if len(data) > MAX_BOUNCE_SIZE:
        return Received("too_large")
    report = await read_report(data)
    record = await find_message(core, [*envelope_recipients, *report.addressed_to],
                                establishment_id)
    if record is None:
        log.info("bounce ignored: not addressed to a valid return address (%s)", report.form)
        return Received("not_ours")
    applied = await core.bounces.apply(record, report)
    if applied:
        log.info("bounce for e-mail %s (%s): %s", record.id, report.form,
                 ", ".join(f"{a.address} {a.kind}" for a in applied))
    if any(a.marked for a in applied):
        await core.bounce_notice(record.id)
        await message_event(core, record.id, "bounced", record.establishment_id)
    return Received(report.kind, record.id, applied)


# -- the establishments' bounce mailboxes ---------------------------------------------------


def _mailbox_of(doc: str | None) -> bool:
    """Whether a stored settings document has a bounce mailbox (read without decrypting)."""
    try:
        imap = (json.loads(doc or "{}").get("bounces") or {}).get("imap")
    except (ValueError, AttributeError):
        return False
    return isinstance(imap, dict) and bool(imap.get("host"))


class BounceMailboxTask:
    """Reads every establishment's bounce mailbox every ``bounces.imap.interval`` seconds,
    in ``postier serve``. Two servers reading the same mailbox may apply a report twice,
    which changes nothing: a recipient is marked once, an address listed once, a notice
    and an event sent once."""

    def __init__(self, core: Postier, round_every: float = MAILBOX_ROUND) -> None:
        self.core = core
        self.round_every = round_every
        self._task: asyncio.Task[None] | None = None
        self._next: dict[int, float] = {}  # establishment -> when its mailbox is due
        self.errors: dict[int, MailboxError] = {}  # the last failure of each mailbox

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="postier-bounce-mailboxes")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        outage = Outage("bounce mailboxes")
        while True:
            try:
                await self.round()
                outage.worked()
            except StoreUnavailable as exc:
                await asyncio.sleep(outage.failed(exc))
                continue
            except Exception:
                log.exception("reading the bounce mailboxes failed; will try again")
            await asyncio.sleep(self.round_every)

    async def round(self, now: float | None = None) -> int:
        """Read the mailboxes that are due; how many reports were read."""
        now = time.time() if now is None else now
        read = 0
        for est_id, _slug, _hosted, doc in await self.core.store.settings_documents(
                disabled=False):
            if not _mailbox_of(doc) or self._next.get(est_id, 0.0) > now:
                continue
            settings = await self.core.stored_settings(est_id, fresh=True)
            mailbox = settings.bounces.imap
            if mailbox is None:
                continue
            self._next[est_id] = now + mailbox.interval
            read += await self.read_one(est_id, mailbox, settings)
        return read

    async def read_one(self, establishment_id: int, mailbox: BounceMailbox,
                       settings: DeliverySettings | None = None) -> int:
        """Read one establishment's mailbox now; how many reports were read."""
        loop = asyncio.get_running_loop()

        def handle(raw: bytes) -> None:
            # Called in the mailbox's thread: each report is applied on the event loop,
            # and marked as read only once applied (a store outage leaves it unread).
            asyncio.run_coroutine_threadsafe(
                receive(self.core, raw, establishment_id=establishment_id), loop).result()

        try:
            result = await poll_mailbox(mailbox, handle, max_size=MAX_BOUNCE_SIZE)
        except MailboxError as exc:
            if establishment_id not in self.errors:
                log.warning("bounce mailbox of establishment %s: %s", establishment_id,
                            exc.message("en"))
            self.errors[establishment_id] = exc
            return 0
        if self.errors.pop(establishment_id, None) is not None:
            log.info("bounce mailbox of establishment %s is read again", establishment_id)
        if result.skipped:
            log.warning("bounce mailbox of establishment %s: %d message(s) over %d MiB "
                        "skipped", establishment_id, result.skipped, MAX_BOUNCE_SIZE >> 20)
        return result.read


async def check_establishment_mailbox(core: Postier, user: User,
                                      candidate: dict[str, Any] | None = None) -> int:
    """Administrators: whether the bounce mailbox can be read — the saved one, or the
    unsaved settings ``candidate`` (same shape as ``bounces.imap``; the saved password
    when none is given). The number of unread messages waiting in it."""
    require_admin(user)
    saved = await core.stored_settings(user.establishment_id)
    settings = saved.updated({"bounces": {"imap": candidate}}) if candidate else saved
    mailbox = settings.bounces.imap
    if mailbox is None or not mailbox.host:
        raise InvalidInput(N_("No bounce mailbox is set: give its server, user name and "
                              "password first."), field="bounces.imap.host")
    await core.check_targets(user.establishment_id, settings)
    return await asyncio.to_thread(check_mailbox, mailbox)
