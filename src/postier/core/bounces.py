"""Bounces, as the service layer sees them: each e-mail's own return address (VERP), the
suppression list, and what a bounce received does to an e-mail and an address.

An e-mail of an establishment with ``bounces.address`` set (``bounces@school.example``)
leaves with the envelope sender ``bounces+<id>-<mac>@school.example``: ``<id>`` names the
e-mail and ``<mac>`` is a keyed digest of it (the installation's key), so a bounce to a
made-up address changes nothing. The address is chosen once, at acceptance, and stored
with the e-mail: a retry keeps it. From, Reply-To and the DKIM signature are unchanged.

What a report says (:mod:`postier.core.bounce_reports` reads it) is applied by
:meth:`Bounces.apply`: a permanent failure marks the recipient ``bounced`` and puts the
address on the establishment's suppression list; temporary ones are counted, and failures
on ``SOFT_DAYS`` different days within ``SOFT_WINDOW`` count as permanent; a complaint
(ARF) suppresses the address. A later e-mail to a suppressed address is accepted, but
that recipient is ``suppressed``: never attempted, with the reason shown to the sender.
"""

from __future__ import annotations

import datetime
import hmac
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from postier.core import policy
from postier.core.accounts import require_admin
from postier.core.bounce_reports import BouncedRecipient, BounceReport
from postier.core.cache import TTLCache
from postier.core.installation import SETTINGS_TTL, Installation
from postier.core.settings import DeliverySettings
from postier.errors import InvalidInput, InvalidSetting, NotFound
from postier.i18n import N_
from postier.store.base import SENT, MessageRecord, User
from postier.store.bounces import COMPLAINT, HARD, SOFT, BounceRecord, Suppression

log = logging.getLogger("postier.bounces")

MAC_LENGTH = 12  # hex digits of the return address's digest: 48 bits, checked in constant time
SOFT_DAYS = 3  # temporary failures on this many different days ...
SOFT_WINDOW = 14 * 86400  # ... within this window count as a permanent one
SYSTEM_ACTOR = "postier"
REPEATED = "repeated"
_TAG = re.compile(rf"^([0-9a-f]{{32}})-([0-9a-f]{{{MAC_LENGTH}}})$")


def address_in_domains(address: str, settings: DeliverySettings) -> bool:
    """Whether the bounce address's domain is the establishment's: its sender's domain or
    one of its allowed domains."""
    domain = address.rpartition("@")[2]
    sender_domain = settings.sender.address.rpartition("@")[2].lower()
    return domain == sender_domain or policy.matching_pattern(
        address, settings.allowed_domains) is not None


def check_bounce_address(settings: DeliverySettings) -> None:
    """Refuse a bounce address outside the establishment's domains."""
    if settings.bounces.address and not address_in_domains(settings.bounces.address, settings):
        raise InvalidSetting(N_(
            "The bounce address must be in one of the establishment's domains (the "
            "sender's domain or an allowed domain): bounces to {address} would not reach "
            "Postier."), field="bounces.address", address=settings.bounces.address)


def suppression_reply(entry: Suppression) -> str:
    """What a suppressed recipient shows: when the address was listed, and why, in the
    remote server's own words when there are some."""
    day = datetime.datetime.fromtimestamp(entry.created_at, datetime.UTC).date().isoformat()
    words = " ".join(str(x) for x in (entry.code, entry.status, entry.diagnostic) if x)
    return f"{day}: {words or entry.reason}"[:1000]


@dataclass(frozen=True)
class Applied:
    """What one recipient of a report changed."""

    address: str
    kind: str  # hard, soft, repeated (temporary failures that count as permanent), complaint
    marked: bool  # the recipient became bounced
    suppressed: bool  # the address was added to the suppression list


class Bounces:
    """Return addresses, the suppression list and the effect of reports."""

    def __init__(self, installation: Installation) -> None:
        self.installation = installation
        self.store = installation.store
        self._keys: TTLCache[int, frozenset[str]] = TTLCache(SETTINGS_TTL)

    # -- return addresses ---------------------------------------------------------------
    def _mac(self, message_id: str) -> str:
        return self.installation.secrets.mac(f"verp:{message_id}")[:MAC_LENGTH]

    def return_address(self, message_id: str, bounce_address: str) -> str:
        """The envelope sender of e-mail ``message_id``: ``bounce_address`` tagged with it."""
        local, _, domain = bounce_address.rpartition("@")
        return f"{local}+{message_id}-{self._mac(message_id)}@{domain}"

    def read_return_address(self, address: str) -> str | None:
        """The e-mail a return address names, or ``None`` when it is not one of ours (no
        tag, or a digest that does not match: made up or altered)."""
        local = address.strip().strip("<>").rpartition("@")[0].lower()
        if "+" not in local:
            return None
        match = _TAG.match(local.rpartition("+")[2])
        if match is None:
            return None
        message_id, mac = match.groups()
        if not hmac.compare_digest(mac, self._mac(message_id)):
            return None
        return message_id

    async def accepts(self, address: str) -> MessageRecord | None:
        """The e-mail a bounce to ``address`` is about, when the address is a valid
        return address of an e-mail still on record."""
        message_id = self.read_return_address(address)
        if message_id is None:
            return None
        return await self.store.get_message(message_id)

    # -- the suppression list at acceptance ---------------------------------------------
    async def listed(self, establishment_id: int) -> frozenset[str]:
        """The lower-cased addresses on the establishment's suppression list, read at most
        every few seconds per process."""
        return await self._keys.get(
            establishment_id, lambda: self.store.suppressed_keys(establishment_id))

    async def suppressed_in(self, establishment_id: int, recipients: Iterable[str]
                            ) -> dict[str, str]:
        """The recipients on the establishment's suppression list: address -> what the
        recipient shows."""
        keys = await self.listed(establishment_id)
        if not keys:
            return {}
        hits = {a: a.lower() for a in recipients if a.lower() in keys}
        if not hits:
            return {}
        entries = {e.key: e for e in await self.store.suppressions_of(
            establishment_id, set(hits.values()))}
        return {a: suppression_reply(entries[k]) for a, k in hits.items() if k in entries}

    # -- the list, for administrators ---------------------------------------------------
    async def suppressions(self, actor: User, *, search: str = "", limit: int = 100, offset: int = 0
                   ) -> tuple[list[Suppression], int]:
        require_admin(actor)
        return await self.store.list_suppressions(
            actor.establishment_id, search=search.strip()[:320], limit=max(1, min(limit, 500)),
            offset=max(0, offset))

    async def suppress(self, actor: User, address: str, note: str = "") -> Suppression:
        """An administrator stops e-mails to ``address`` (audited)."""
        require_admin(actor)
        try:
            address = policy.normalize_address(address)
        except InvalidInput as exc:
            exc.field = "address"
            raise
        entry = Suppression(actor.establishment_id, address, "manual", None, "",
                            " ".join(note.split())[:500], None, time.time(), actor.username)
        if await self.store.add_suppression(entry):
            await self.store.audit(actor.establishment_id, actor.username, "suppression.add",
                                   address, {})
        self._keys.forget(actor.establishment_id)
        (stored,) = await self.store.suppressions_of(actor.establishment_id, [entry.key])
        return stored

    async def lift(self, actor: User, address: str) -> Suppression:
        """An administrator lifts ``address``: e-mails reach it again (audited)."""
        require_admin(actor)
        try:  # listed in its normal form (a Unicode domain); any other form finds it too
            key = policy.normalize_address(address).lower()
        except InvalidInput:
            key = address.strip().lower()
        entry = await self.store.remove_suppression(actor.establishment_id, key)
        if entry is None:
            raise NotFound(N_("{address} is not on the suppression list."),
                           address=address[:320])
        await self.store.audit(actor.establishment_id, actor.username, "suppression.remove",
                               entry.address, {"reason": entry.reason})
        self._keys.forget(actor.establishment_id)
        return entry

    # -- what a report does ---------------------------------------------------------------
    async def apply(self, record: MessageRecord, report: BounceReport,
                    now: float | None = None) -> list[Applied]:
        """Apply a report about e-mail ``record`` (whose return address it came to): for
        each of the e-mail's recipients it names, record the bounce, mark the recipient
        and suppress the address as the module's docstring says. Recipients the e-mail
        never had are ignored: a report cannot touch anybody else."""
        ours = {r.address.lower(): r for r in record.recipients}
        out: list[Applied] = []
        now = time.time() if now is None else now
        for item in _relevant(report):
            rcpt = ours.get(item.address.lower())
            if rcpt is None or rcpt.status not in (SENT, "bounced"):
                continue
            kind = COMPLAINT if report.kind == "complaint" else HARD if item.permanent else SOFT
            bounce = BounceRecord(record.establishment_id, record.id, rcpt.address, kind,
                                  item.status, item.code, item.diagnostic[:500], now)
            await self.store.record_bounce(bounce)
            if kind == SOFT and await self.store.soft_bounce_days(
                    record.establishment_id, rcpt.address.lower(), now - SOFT_WINDOW) >= SOFT_DAYS:
                kind = REPEATED
            marked = kind in (HARD, REPEATED) and await self.store.mark_bounced(bounce)
            suppressed = kind != SOFT and await self._suppress(record, rcpt.address, kind,
                                                               item, now)
            out.append(Applied(rcpt.address, kind, marked, suppressed))
        return out

    async def _suppress(self, record: MessageRecord, address: str, kind: str,
                        item: BouncedRecipient, now: float) -> bool:
        reason = {HARD: "bounce", COMPLAINT: "complaint", REPEATED: "repeated"}[kind]
        added = await self.store.add_suppression(Suppression(
            record.establishment_id, address, reason, item.code, item.status,
            item.diagnostic[:500], record.id, now, SYSTEM_ACTOR))
        if added:
            self._keys.forget(record.establishment_id)
            log.info("%s added to the suppression list of establishment %s (%s %s)",
                     address, record.establishment_id, reason, item.status)
        return added


def _relevant(report: BounceReport) -> list[BouncedRecipient]:
    """The recipients a report says something about: failures and delays of a delivery
    report, every recipient of a complaint; nothing for auto-replies and unknown mail."""
    if report.kind == "complaint":
        return list(report.recipients)
    if report.kind != "dsn":
        return []
    return [r for r in report.recipients if r.action in ("failed", "delayed")]

