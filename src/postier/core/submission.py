"""Submission: the sender policy applied, the e-mail rendered, stored durably in one
commit, and only then accepted — for the HTTP API, the SDK and the CLI (JSON e-mails) and
for SMTP (an RFC 5322 message whose sender is rewritten)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

from postier.core import policy
from postier.core.bounces import Bounces
from postier.core.installation import Installation
from postier.core.message import MessageIn, build_message
from postier.core.notices import Notices
from postier.core.queue_entry import new_message_id, queued
from postier.core.sender_decision import decide_sender, message_id_for
from postier.core.sender_verification import SenderAddresses
from postier.core.settings import DeliverySettings
from postier.core.submitted_message import read_submitted, rewrite_submitted
from postier.errors import DelegationOff, PostierError
from postier.i18n import N_
from postier.store.base import PRIORITIES, EnqueueResult, NewMessage, User


class _Sender(NamedTuple):
    """A sender decision taken during a submission, with its From as stored."""

    decision: policy.SenderDecision
    header_from: str


_Decisions = dict[tuple[str | None, tuple[str, ...]], _Sender]


class Submission:
    """Accepting e-mails into the queue."""

    def __init__(self, installation: Installation, senders: SenderAddresses,
                 bounces: Bounces, notices: Notices) -> None:
        self.installation = installation
        self.store = installation.store
        self.config = installation.config
        self.senders = senders
        self.bounces = bounces
        self.notices = notices

    async def submit(self, user: User, messages: Sequence[MessageIn]) -> list[EnqueueResult]:
        """Accept messages: policy, render, store durably in one commit, then return."""
        settings = await self.installation.delivery_settings(user.establishment_id)
        if not settings.delegation:
            raise DelegationOff(
                hint=N_("Send from your workstation with your own parameters, or ask an "
                        "administrator to turn central sending on.")
            )
        verified = await self.senders.verified(user, settings)
        # The decision depends only on the message's From and Reply-To: a batch (a mass
        # mailing: the same sender, thousands of recipients) decides once per pair.
        decisions: _Decisions = {}
        batch = [self._prepare(user, settings, m, index if len(messages) > 1 else None,
                               verified, decisions)
                 for index, m in enumerate(messages)]
        await self._bounce_handling(user.establishment_id, settings, batch)
        results = await self.store.enqueue(batch)
        self.installation.wake_delivery()
        await self._tell_suppressed(user, settings, batch, results)
        # Built directly: cheaper than dataclasses.replace for each e-mail of a batch.
        return [EnqueueResult(r.id, r.status, r.duplicate, m.sender_rule)
                for r, m in zip(results, batch, strict=True)]

    async def submit_raw(
        self,
        user: User,
        mail_from: str,
        recipients: Sequence[str],
        raw: bytes,
        *,
        smtputf8: bool = False,
        idempotency_key: str | None = None,
    ) -> EnqueueResult:
        """Accept a message submitted over SMTP: the envelope sender and the From must be
        the account's own (or granted) addresses; the policy then rewrites the sender."""
        settings = await self.installation.delivery_settings(user.establishment_id)
        if not settings.delegation:
            raise DelegationOff()
        headers = read_submitted(raw)
        requested = headers.from_addresses[0] if headers.from_addresses else mail_from
        for address in dict.fromkeys((mail_from, *headers.from_addresses)):
            if address != requested:  # the decision below checks that one
                decide_sender(user, settings, address)  # SenderForbidden if not theirs
        decision = decide_sender(user, settings, requested, headers.reply_to,
                                 await self.senders.verified(user, settings))
        message_id = message_id_for(decision, self.config.hostname)
        data = rewrite_submitted(raw, decision, message_id=message_id,
                                 max_size=self.config.max_message_size, smtputf8=smtputf8)
        wire = (lambda a: a) if smtputf8 else policy.ascii_address
        batch = [
            NewMessage(
                id=new_message_id(),
                establishment_id=user.establishment_id,
                user_id=user.id,
                priority=PRIORITIES["normal"],
                envelope_from=wire(decision.envelope_from),
                header_from=decision.formatted_from,
                message_id=headers.message_id or message_id,
                subject=headers.subject,
                data=data,
                recipients=list(dict.fromkeys(recipients)),
                smtputf8=smtputf8,
                idempotency_key=idempotency_key,
                sender_rule=decision.rule,
            )
        ]
        await self._bounce_handling(user.establishment_id, settings, batch)
        (result,) = await self.store.enqueue(batch)
        self.installation.wake_delivery()
        await self._tell_suppressed(user, settings, batch, [result])
        return dataclasses.replace(result, sender_rule=decision.rule)

    async def _bounce_handling(self, establishment_id: int, settings: DeliverySettings,
                               batch: list[NewMessage]) -> None:
        """Each e-mail's own return address, when the establishment has a bounce address;
        the recipients on its suppression list, who are never attempted."""
        if settings.bounces.address:
            for m in batch:
                m.envelope_from = policy.ascii_address(
                    self.bounces.return_address(m.id, settings.bounces.address))
        held = await self.bounces.suppressed_in(
            establishment_id, (a for m in batch for a in m.recipients))
        if held:
            for m in batch:
                mine = {a: held[a] for a in m.recipients if a in held}
                m.suppressed = mine or None

    async def _tell_suppressed(self, user: User, settings: DeliverySettings,
                               batch: list[NewMessage],
                               results: Sequence[EnqueueResult]) -> None:
        """The sender's notice, one per submission, of recipients left out as
        suppressed."""
        held = [m for m, r in zip(batch, results, strict=True)
                if m.suppressed and not r.duplicate]
        if held:
            await self.notices.suppressed_notice(user, held, settings)

    def _prepare(
        self, user: User, settings: DeliverySettings, msg: MessageIn, index: int | None,
        verified: Sequence[str] | None = None, decisions: _Decisions | None = None,
    ) -> NewMessage:
        """One message of a submission rendered for the queue; ``decisions`` holds the
        sender decisions already taken for the same user, settings and ``verified``."""
        try:
            key = (msg.from_, tuple(msg.reply_to))
            sender = decisions.get(key) if decisions is not None else None
            if sender is None:
                decision = decide_sender(user, settings, msg.from_, msg.reply_to, verified)
                sender = _Sender(decision, decision.formatted_from)
                if decisions is not None:
                    decisions[key] = sender
            decision = sender.decision
            built = build_message(
                msg,
                decision,
                message_id=message_id_for(decision, self.config.hostname),
                max_size=self.config.max_message_size,
            )
        except PostierError as exc:
            if index is not None and exc.field is None:
                exc.field = f"messages.{index}"
            elif index is not None:
                exc.field = f"messages.{index}.{exc.field}"
            raise
        new = queued(built, sender.header_from, establishment_id=user.establishment_id,
                     user_id=user.id, priority=PRIORITIES[msg.priority],
                     idempotency_key=msg.idempotency_key)
        new.sender_rule = decision.rule
        return new
