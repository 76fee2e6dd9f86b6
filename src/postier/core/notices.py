"""E-mails Postier itself writes for an establishment: the notices that tell a sender an
e-mail could not be delivered (or is late), and any other system e-mail (sender
verification codes, alerts), from the establishment's sender."""

from __future__ import annotations

from collections.abc import Sequence

from postier.core import policy, reasons
from postier.core.installation import Installation
from postier.core.message import MessageIn, build_message
from postier.core.queue_entry import SYSTEM_USER, queued
from postier.core.sender_decision import message_id_for
from postier.core.settings import DeliverySettings
from postier.i18n import N_, translate
from postier.store.base import (
    BOUNCED,
    DEFERRED,
    FAILED,
    PENDING,
    PRIORITIES,
    SUPPRESSED,
    NewMessage,
    User,
)

NOTICE_PREFIX = "notice:"
NOTICE_MESSAGES = 200  # e-mails of one submission a notice names at most
NOTICE_SUBJECT = N_("Undelivered")
NOTICE_BODY = N_(
    "Your e-mail \"{subject}\" could not be delivered to:\n{recipients}\n\nWhat to do: "
    "{hint}"
)
NOTICE_HINT = N_("Check the addresses, then send the e-mail again to these recipients.")
DELAY_SUBJECT = N_("Delayed")
DELAY_BODY = N_(
    "Your e-mail \"{subject}\" has not reached these recipients yet:\n{recipients}\n\n"
    "{hint}"
)
DELAY_HINT = N_(
    "Nothing is lost: Postier keeps trying and tells you again only if it gives up. If it "
    "is urgent, reach these people another way."
)

BOUNCE_SUBJECT = N_("Returned")
BOUNCE_BODY = N_(
    "Your e-mail \"{subject}\" was handed over, but the recipient's mail server reported "
    "later that it could not be delivered to:\n{recipients}\n\nWhat to do: {hint}"
)
BOUNCE_HINT = N_(
    "Check these addresses with the people concerned. Postier no longer writes to them "
    "until an administrator lifts them from the suppression list."
)
SUPPRESSED_BODY = N_(
    "Your e-mail \"{subject}\" was not sent to these addresses, which are on the "
    "establishment's suppression list because they were refused before:\n{recipients}\n\n"
    "What to do: {hint}"
)
SUPPRESSED_HINT = N_(
    "Check these addresses with the people concerned; an administrator can lift an "
    "address that works again (Blocked addresses page)."
)

__all__ = ["NOTICE_PREFIX", "SYSTEM_USER", "Notices"]


class Notices:
    """Failure and delay notices to senders; system e-mails."""

    def __init__(self, installation: Installation) -> None:
        self.installation = installation
        self.store = installation.store

    async def failure_notice(self, message_id: str) -> str | None:
        """Tell the sender, by e-mail, which recipients an e-mail could not reach for good,
        the relay's reply and what to do — in French and English, since the notice may be
        read anywhere. Sent once per e-mail; never about a notice itself."""
        return await self._notice(message_id, "failure", (FAILED, SUPPRESSED), NOTICE_SUBJECT,
                                  NOTICE_BODY, NOTICE_HINT)

    async def bounce_notice(self, message_id: str) -> str | None:
        """Tell the sender once that recipients of a delivered e-mail bounced later."""
        return await self._notice(message_id, "bounce", (BOUNCED,), BOUNCE_SUBJECT,
                                  BOUNCE_BODY, BOUNCE_HINT)

    async def suppressed_notice(self, user: User, held: Sequence[NewMessage],
                                settings: DeliverySettings) -> str | None:
        """Tell ``user`` once per submission that its e-mails ``held`` (just accepted) were
        not sent to suppressed addresses: one notice for a whole batch (a mass mailing),
        written from the accepted e-mails themselves (no reading back from the store)."""
        if not held or user.disabled or not user.email or user.role == "relay":
            return None
        lines = "\n".join(f"  - {address} : {reply}" for m in held[:NOTICE_MESSAGES]
                          for address, reply in (m.suppressed or {}).items())
        first = held[0]

        def text(lang: str) -> str:
            return translate(lang, SUPPRESSED_BODY, subject=first.subject, recipients=lines,
                             hint=translate(lang, SUPPRESSED_HINT))

        return await self.system_email(
            user.establishment_id, [user.email],
            f"{translate('fr', NOTICE_SUBJECT)} / {NOTICE_SUBJECT} : {first.subject}",
            "\n\n".join([text("fr"), "-- English --", text("en")]),
            headers={"X-Postier-Notice": "suppressed", "X-Postier-Message": first.id},
            idempotency_key=f"{NOTICE_PREFIX}suppressed:{first.id}", settings=settings,
        )

    async def delay_notice(self, message_id: str) -> str | None:
        """Warn the sender once that an e-mail is still waiting (Postfix's
        delay_warning_time): it is not lost, Postier keeps trying."""
        return await self._notice(message_id, "delay", (DEFERRED, PENDING), DELAY_SUBJECT,
                                  DELAY_BODY, DELAY_HINT)

    async def _notice(self, message_id: str, kind: str, statuses: tuple[str, ...],
                      subject: str, body: str, hint: str) -> str | None:
        record = await self.store.get_message(message_id)
        if record is None or (record.idempotency_key or "").startswith(NOTICE_PREFIX):
            return None
        concerned = [r for r in record.recipients if r.status in statuses]
        user = await self.store.get_user(user_id=record.user_id) if concerned else None
        if user is None or user.disabled or not user.email or user.role == "relay":
            # A downstream Postier server tells its own user; it needs no e-mail from us.
            return None
        settings = await self.installation.delivery_settings(record.establishment_id)
        # The relay's reply only when a relay replied: never a Python exception's text.
        lines = "\n".join(f"  - {r.address} : {r.code} {r.reply or ''}".rstrip()
                           if r.code is not None else f"  - {r.address} : {r.reply}"
                           if r.status == SUPPRESSED else f"  - {r.address}"
                           for r in concerned)

        def text(lang: str) -> str:
            # The sender's wording: what happened and what is asked of them, never the
            # administrator's remedy (see postier.core.reasons).
            why = reasons.explain(record.last_error, lang, admin=False)
            return translate(lang, body, subject=record.subject, recipients=lines,
                             hint=why["sender"] if kind == "failure" and why
                             else translate(lang, hint))

        return await self.system_email(
            record.establishment_id, [user.email],
            f"{translate('fr', subject)} / {subject} : {record.subject}",
            "\n\n".join([text("fr"), "-- English --", text("en")]),
            headers={"X-Postier-Notice": kind, "X-Postier-Message": record.id},
            idempotency_key=f"{NOTICE_PREFIX}{kind}:{record.id}",
            settings=settings,
        )

    async def system_email(
        self,
        establishment_id: int,
        to: Sequence[str],
        subject: str,
        text: str,
        *,
        headers: dict[str, str],
        idempotency_key: str,
        settings: DeliverySettings | None = None,
        priority: int = PRIORITIES["normal"],
    ) -> str:
        """Queue an e-mail Postier itself writes for the establishment (a notice, an
        alert): from the establishment's sender, once per ``idempotency_key`` (atomic with
        the store's idempotency check, whatever the number of workers)."""
        settings = settings or await self.installation.delivery_settings(establishment_id)
        notice = MessageIn.model_validate({
            "to": list(to), "subject": subject[:900], "text": text, "headers": headers,
            "idempotency_key": idempotency_key,
        })
        decision = policy.SenderDecision(
            from_name=settings.sender.name or "Postier",
            from_address=settings.sender.address or to[0],
            reply_to=(), envelope_from=settings.sender.address or to[0],
            rule="outside_allowed", user_address=to[0], matched_pattern=None,
            allowed_domains=tuple(settings.allowed_domains),
        )
        message_id = message_id_for(decision, self.installation.config.hostname)
        built = build_message(notice, decision, message_id=message_id)
        # Sent by the establishment, not by a user: it is nobody's "my e-mails".
        (result,) = await self.store.enqueue([queued(
            built, decision.formatted_from, establishment_id=establishment_id,
            user_id=SYSTEM_USER, idempotency_key=notice.idempotency_key, priority=priority,
        )])
        if not result.duplicate:
            self.installation.wake_delivery()
        return result.id
