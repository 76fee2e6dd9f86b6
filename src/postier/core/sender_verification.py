"""Sender address verification: a user proves an address is theirs before it is the From.

When an establishment turns ``verify_sender_addresses`` on, an address inside the allowed
domains is used as the From only once its user confirmed it with a 6-digit code Postier
e-mailed to it (through the establishment's relay, like the failure notices). Until then
the address is treated as one outside the allowed domains: the establishment's sender is
the From and the user's address the Reply-To, so e-mails still leave (rule
``unverified_sender``, explained to the user). An address outside the allowed domains stays
rewritten even once verified: the allowed domains say what the relay may sign and send for
(SPF, DKIM, DMARC), and owning a Gmail mailbox does not make a school relay a legitimate
sender for gmail.com.

Only an address the user may already send as (their own, or one an administrator granted
them) can be verified, so Postier never e-mails codes to strangers' addresses on request.
Each user's verifications are their own: two people sharing a granted address each verify
it, and no answer says anything about another user's addresses.

The code is stored as a keyed digest (:meth:`postier.core.crypto.SecretBox.mac`), expires after
30 minutes, and dies after 5 wrong attempts; codes are sent at most once a minute per
address and 5 times a day per user.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass

from postier.core import policy
from postier.core.domains import Domains, address_claims
from postier.core.installation import SETTINGS_TTL, Installation
from postier.core.notices import NOTICE_PREFIX, Notices
from postier.core.settings import DeliverySettings
from postier.errors import Conflict, InvalidInput, NotFound, PostierError
from postier.i18n import LANGUAGES, N_, normalize, translate
from postier.store.base import SenderAddress, User

CODE_DIGITS = 6
CODE_TTL = 30 * 60  # seconds a code may be used
MAX_FAILURES = 5  # wrong codes before the code is void
RESEND_INTERVAL = 60  # seconds between two codes for one address
DAY_LIMIT = 5  # codes a user may be sent in 24 hours

VERIFIED, PENDING, EXPIRED, LOCKED = "verified", "pending", "expired", "locked"

NOTE_UNVERIFIED = N_(
    "Sender address not verified: the establishment's sender was used and your address put "
    "in Reply-To. Verify it in My account to send as it."
)

_SUBJECT = N_("Verification code for {address}")
_BODY = N_(
    "{name} ({username}, {establishment}) asked to send e-mails with the address "
    "{address} as the sender.\n\n"
    "The verification code is: {code}\n\n"
    "It is valid for {minutes} minutes. Enter it in My account, under \"Sender "
    "addresses\".\n\n"
    "If you did not ask for this, do not give this code to anybody and ignore this e-mail: "
    "without the code, this address will not be used as the sender. If it happens again, "
    "tell the establishment's administrator."
)
_NOT_YOURS = N_(
    "You may verify only an address you may send as: your own ({own}) or one an "
    "administrator granted you; {address} is neither."
)
_BAD_CODE = N_("The code is the {digits} digits of the e-mail sent to {address}.")


class TooManyCodes(PostierError):
    code = "too_many_codes"
    http_status = 429
    transient = True
    default_template = N_(
        "A code was sent to {address} less than a minute ago: wait {seconds} seconds "
        "before asking for another."
    )


class WrongCode(InvalidInput):
    code = "wrong_code"
    default_template = N_("This is not the right code: {left} attempts left.")


class CodeLocked(Conflict):
    code = "code_locked"
    default_template = N_("Too many wrong codes: this code no longer works.")


class CodeExpired(Conflict):
    code = "code_expired"
    default_template = N_("This code has expired: a code is valid for {minutes} minutes.")


_ASK_AGAIN = N_("Ask for a new code; it is sent to the same address.")
_DAY = N_(
    "You were sent {limit} codes in the last 24 hours: wait {minutes} minutes before "
    "asking for another."
)
_NO_CODE = N_("No code is waiting for {address}.")
_ASK_FIRST = N_("Ask for a code first.")
_CHECK_MAIL = N_("Use the code of the last e-mail received at {address}.")


@dataclass(frozen=True)
class AddressState:
    """One of a user's sender addresses as they see it."""

    address: str
    status: str  # verified | pending | expired | locked
    verified_at: float | None = None
    expires_at: float | None = None  # of the waiting code
    attempts_left: int | None = None  # for the waiting code


def _state(row: SenderAddress, now: float) -> AddressState:
    if row.verified_at is not None:
        return AddressState(row.address, VERIFIED, verified_at=row.verified_at)
    if row.code_expires_at is None:
        return AddressState(row.address, LOCKED if row.failed_attempts >= MAX_FAILURES
                            else EXPIRED)
    status = PENDING if row.code_expires_at > now else EXPIRED
    return AddressState(row.address, status, expires_at=row.code_expires_at,
                        attempts_left=MAX_FAILURES - row.failed_attempts)


class SenderAddresses:
    """A user's verified sender addresses: asking for a code, confirming it, listing,
    removing; and what the sender policy needs (:meth:`verified`)."""

    def __init__(self, installation: Installation, domains: Domains, notices: Notices) -> None:
        self.installation = installation
        self.store = installation.store
        self.domains = domains
        self.notices = notices
        self._verified: dict[int, tuple[tuple[str, ...], float]] = {}

    async def verified(self, user: User, settings: DeliverySettings) -> tuple[str, ...] | None:
        """The user's verified addresses when the establishment asks for verification,
        else ``None``. A ``relay`` account (another Postier server handing its e-mails on)
        is not asked: the server it serves applies its own policy."""
        if not settings.verify_sender_addresses or user.role == "relay":
            return None
        now = time.monotonic()
        cached = self._verified.get(user.id)
        if cached is not None and now - cached[1] < SETTINGS_TTL:
            return cached[0]
        # Cached like the tokens: one query per user every few seconds on the submission
        # path; a change made in this process forgets the user's entry at once.
        rows = await self.store.list_sender_addresses(user.id)
        addresses = tuple(r.address for r in rows if r.verified_at is not None)
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[user.id] = (addresses, now)
        return addresses

    def _own(self, user: User, address: str) -> str:
        """``address`` as the account spells it (the user's own or the granted one), when
        the user may send as it; ``SenderForbidden`` otherwise."""
        own = policy.normalize_address(user.email)
        address = policy.sendable(own, address, user.granted_senders, field="address",
                                  template=_NOT_YOURS)
        for known in (own, *user.granted_senders):
            if known.lower() == address.lower():
                return known
        return address

    async def listing(self, user: User) -> list[AddressState]:
        now = time.time()
        return [_state(r, now) for r in await self.store.list_sender_addresses(user.id)]

    async def _find(self, user: User, address: str) -> AddressState | None:
        key = address.lower()
        return next((s for s in await self.listing(user) if s.address.lower() == key), None)

    async def request(self, user: User, address: str, lang: str) -> AddressState:
        """Send a new code to ``address`` (one of the user's), unless it is verified."""
        address = self._own(user, address)
        current = await self._find(user, address)
        if current is not None and current.status == VERIFIED:
            return current
        # Verifying an address at another establishment's domain (or at the platform's)
        # would prepare a claim on it: refused like the other doors.
        await self.domains.check(user.establishment_id,
                                      address_claims([address], "address"))
        code = f"{secrets.randbelow(10 ** CODE_DIGITS):0{CODE_DIGITS}d}"
        now = time.time()
        wait = await self.store.start_sender_code(
            establishment_id=user.establishment_id, user_id=user.id, address=address,
            code_hash=self._digest(user, address, code), expires_at=now + CODE_TTL, now=now,
            min_interval=RESEND_INTERVAL, day_limit=DAY_LIMIT,
        )
        if wait > 0:
            if wait <= RESEND_INTERVAL:
                raise TooManyCodes(address=address, seconds=math.ceil(wait), field="address")
            raise TooManyCodes(_DAY, limit=DAY_LIMIT, minutes=math.ceil(wait / 60),
                               field="address")
        await self._send_code(user, address, code, lang)
        await self.store.audit(user.establishment_id, user.username, "sender.code_sent",
                                    address)
        return AddressState(address, PENDING, expires_at=now + CODE_TTL,
                            attempts_left=MAX_FAILURES)

    async def confirm(self, user: User, address: str, code: str) -> AddressState:
        """Check ``code`` against the one waiting for ``address``; verified if right."""
        address = self._own(user, address)
        code = code.strip().replace(" ", "")
        current = await self._find(user, address)
        if current is not None and current.status == VERIFIED:
            return current
        if len(code) != CODE_DIGITS or not code.isascii() or not code.isdigit():
            # Not counted as a wrong attempt: it cannot be the code.
            raise InvalidInput(_BAD_CODE, field="code", digits=CODE_DIGITS, address=address)
        outcome, left = await self.store.check_sender_code(
            user_id=user.id, address=address, code_hash=self._digest(user, address, code),
            now=time.time(), max_failures=MAX_FAILURES,
        )
        if outcome == "verified":
            self._verified.pop(user.id, None)
            await self.store.audit(user.establishment_id, user.username,
                                        "sender.verified", address)
            found = await self._find(user, address)
            assert found is not None
            return found
        if outcome == "wrong":
            raise WrongCode(hint=_CHECK_MAIL, field="code", left=left, address=address)
        if outcome == "locked":
            await self.store.audit(user.establishment_id, user.username,
                                        "sender.code_locked", address)
            raise CodeLocked(hint=_ASK_AGAIN, field="code")
        if outcome == "expired":
            raise CodeExpired(hint=_ASK_AGAIN, field="code", minutes=CODE_TTL // 60)
        raise NotFound(_NO_CODE, hint=_ASK_FIRST, address=address)

    async def remove(self, user: User, address: str) -> None:
        """Forget one of the user's addresses (verified or not)."""
        try:
            address = policy.normalize_address(address)
            found = await self.store.delete_sender_address(user.id, address)
        except InvalidInput:
            address, found = address[:100], False
        if not found:
            raise NotFound(N_("{address} is not among your sender addresses."),
                           address=address)
        self._verified.pop(user.id, None)
        await self.store.audit(user.establishment_id, user.username, "sender.removed",
                                    address)

    def _digest(self, user: User, address: str, code: str) -> str:
        # Bound to the user and the address: a code is worth nothing anywhere else.
        return self.installation.secrets.mac(f"sender-code\0{user.id}\0{address.lower()}\0{code}")

    async def _send_code(self, user: User, address: str, code: str, lang: str) -> None:
        est = await self.installation.establishment(user.establishment_id)
        params = {
            "name": user.display_name or user.username, "username": user.username,
            "establishment": est.name if est else "", "address": address, "code": code,
            "minutes": CODE_TTL // 60,
        }
        # The user's language first; the other one after, since whoever reads the e-mail
        # may not be the person who asked.
        lang = normalize(lang)
        order = [lang, *(other for other in LANGUAGES if other != lang)]
        parts = [translate(order[0], _BODY, **params)]
        for other in order[1:]:
            parts += ["-- English --" if other == "en" else "-- Français --",
                      translate(other, _BODY, **params)]
        await self.notices.system_email(
            user.establishment_id, [address], translate(lang, _SUBJECT, address=address),
            "\n\n".join(parts),
            headers={"X-Postier-Notice": "sender-verification"},
            idempotency_key=f"{NOTICE_PREFIX}verify:{user.id}:{secrets.token_hex(12)}",
        )
