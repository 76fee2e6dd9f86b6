"""Sender policy: which From, Reply-To and envelope sender an e-mail leaves with.

The establishment administrator may list *allowed domains* ("domaines autorisés"). A user
whose address is inside them sends as themselves; anyone else (and everyone when the list
is empty) sends under the establishment's sender name and address, with their own address
in Reply-To so that answers still reach them. This keeps e-mails from being taken for spam:
a school relay that signs for ``ac-lyon.fr`` must not put ``@gmail.com`` in the From.

A user may only send as themselves or as an address an administrator granted them
(:class:`~postier.errors.SenderForbidden` otherwise): promise 4, nobody sends as someone
else.

Everything here is pure (no I/O) and cheap, because :func:`decide_sender` and
:func:`normalize_address` run for every accepted message.

Domain patterns: ``ac-lyon.fr`` matches exactly that domain; ``*.ac-lyon.fr`` matches any
subdomain (``college.ac-lyon.fr``, ``a.b.ac-lyon.fr``) but **not** ``ac-lyon.fr`` itself, so
an administrator who wants both lists both. Matching ignores case and compares the IDNA
(ASCII) forms, so ``écoles.fr`` and ``xn--coles-9ra.fr`` are the same domain.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.headerregistry import Address
from typing import Literal

import idna
from email_validator import EmailNotValidError, validate_email

from postier.errors import (
    InvalidAddress,
    InvalidDomainPattern,
    SenderForbidden,
    SenderNotConfigured,
)
from postier.i18n import N_, translate

__all__ = [
    "Rule",
    "SenderDecision",
    "ascii_address",
    "ascii_domain",
    "clean_display_name",
    "decide_sender",
    "matching_pattern",
    "normalize_address",
    "normalize_domain_pattern",
    "sendable",
    "via_name",
]

Rule = Literal["inside_allowed", "outside_allowed", "no_allowed_domains", "unverified_sender"]

# RFC 5321 caps a path at 256 octets; anything much longer is refused before the (costlier)
# validator runs, which also keeps hostile megabyte strings out of the cache below.
_MAX_ADDRESS_INPUT = 320

# CR, LF and NUL are what header injection is made of; the other characters are line
# breaks too for str.splitlines(), which the email package uses when it handles headers.
_BREAKS = frozenset("\r\n\0\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")

# Display names: every control or line-breaking character becomes a space (a name is only
# shown, so cleaning it is kinder than refusing the whole e-mail).
_NAME_JUNK = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\s]+")

_LDH = re.compile(r"[a-z0-9-]+")
_PLAIN_DOMAIN = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)

# The common case, a plain ASCII dot-atom at an ordinary host name, is checked by one
# expression (batches of thousands of distinct recipients miss the cache below); anything
# else (quotes, IDN, Punycode, special-use names, long parts) goes to email-validator.
# tests/unit/test_address_fast_path.py holds both to the same answers.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(
    rf"(?P<local>{_ATEXT}(?:\.{_ATEXT})*)"
    r"@(?P<domain>(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63})"
)
_SPECIAL_USE = frozenset({"arpa", "invalid", "local", "localhost", "onion", "test"})

_EXPLAIN_INSIDE = N_("{address} is inside the allowed domain {pattern}: it is used as the sender.")
_EXPLAIN_INSIDE_REPLY = N_(
    "{address} is inside the allowed domain {pattern}: it is used as the sender "
    "and replies go to {reply_to}."
)
_EXPLAIN_OUTSIDE_ONE = N_(
    "{address} is outside the allowed domain {domains}: the establishment's sender "
    "({sender}) is used and replies go to {reply_to}."
)
_EXPLAIN_OUTSIDE_MANY = N_(
    "{address} is outside the allowed domains {domains}: the establishment's sender "
    "({sender}) is used and replies go to {reply_to}."
)
_EXPLAIN_NO_DOMAINS = N_(
    "No allowed domain is set: the establishment's sender ({sender}) is used for every "
    "user and replies go to {reply_to}."
)
_EXPLAIN_UNVERIFIED = N_(
    "{address} is not verified: the establishment's sender ({sender}) is used and replies "
    "go to {reply_to}. Verify the address in My account to send as it."
)
_HINT_SET_SENDER = N_(
    "An administrator must set the sender address in Paramètres d'envoi des e-mails."
)

# Reasons are fixed English phrases, marked so that a catalogue can translate them too.
_R_EMPTY_ADDRESS = N_("the address is empty")
_R_BREAK = N_("line breaks and NUL characters are not allowed")
_R_DISPLAY_NAME = N_("write the address alone, without a name or angle brackets")
_R_TOO_LONG_ADDRESS = N_("the address is too long")
_R_EMPTY = N_("the domain is empty")
_R_SPACE = N_("a domain cannot contain spaces")
_R_URL = N_("write only the domain, not a web address")
_R_AT = N_("write only the part after the @")
_R_WILDCARD_ALONE = N_("a * must be followed by a domain")
_R_WILDCARD_PLACE = N_("the * may only come first, followed by a dot")
_R_TRAILING_DOT = N_("remove the final dot")
_R_LEADING_DOT = N_("remove the leading dot")
_R_EMPTY_LABEL = N_("two dots in a row leave an empty part")
_R_LABEL_TOO_LONG = N_("a part between dots is longer than 63 characters")
_R_DOMAIN_TOO_LONG = N_("the domain is longer than 253 characters")
_R_HYPHEN = N_("a part between dots cannot start or end with a hyphen")
_R_ASCII_CHARS = N_("only letters, digits, hyphens and dots are allowed")
_R_IDNA = N_("it is not a valid internationalised domain name")


# --------------------------------------------------------------------------- addresses


def normalize_address(addr: str) -> str:
    """Validate one bare e-mail address and return its normal form.

    The local part is kept as given (email-validator only applies Unicode NFC); the
    domain becomes lower-case Unicode, so ``Jean@AC-Lyon.FR`` gives ``Jean@ac-lyon.fr`` and
    ``a@xn--coles-9ra.fr`` gives ``a@écoles.fr``. Surrounding spaces are ignored.
    Raises :class:`InvalidAddress` (also a ``ValueError``) with a short reason.
    """
    value = addr.strip(" \t")
    # Length first: everything after it, and the message, then handle a few hundred
    # characters at most whatever was submitted.
    if len(value) > _MAX_ADDRESS_INPUT:
        raise InvalidAddress(address=value[:40] + "…", reason=_R_TOO_LONG_ADDRESS)
    if not _BREAKS.isdisjoint(value):
        raise InvalidAddress(address=value, reason=_R_BREAK)
    if not value:
        raise InvalidAddress(address=addr, reason=_R_EMPTY_ADDRESS)
    if "<" in value or ">" in value:
        raise InvalidAddress(address=value, reason=_R_DISPLAY_NAME)
    plain = _PLAIN_ADDRESS.fullmatch(value)
    if plain is not None:
        local, domain = plain.group("local"), plain.group("domain").lower()
        if (len(local) <= 64 and len(value) <= 254 and "--" not in domain
                and domain.rpartition(".")[2] not in _SPECIAL_USE):
            return f"{local}@{domain}"
    return _validated(value)


@functools.lru_cache(maxsize=8192)
def _validated(value: str) -> str:
    # Cached because the same parents and teachers receive e-mail after e-mail, and
    # email-validator is slow for a hot path; failures are not cached (they raise).
    try:
        result = validate_email(value, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        # The template adds its own final full stop.
        raise InvalidAddress(address=value, reason=str(exc).rstrip(".")) from None
    return str(result.normalized)


def ascii_domain(domain: str) -> str:
    """The IDNA (ASCII, lower-case) form of ``domain``; raises ``ValueError`` if it has none."""
    return _ascii_domain(domain)


@functools.lru_cache(maxsize=4096)
def _ascii_domain(domain: str) -> str:
    if _PLAIN_DOMAIN.fullmatch(domain):
        # Fast path: most domains are plain ASCII host names; only their case needs folding.
        lowered = domain.lower()
        if not lowered.startswith("xn--") and ".xn--" not in lowered:
            return lowered
    return idna.encode(domain, uts46=True).decode("ascii")


def ascii_address(address: str) -> str:
    """``address`` with its domain in IDNA form, as SMTP without SMTPUTF8 needs it.

    The local part is untouched: a non-ASCII local part still needs SMTPUTF8.
    """
    local, _, domain = address.rpartition("@")
    return f"{local}@{ascii_domain(domain)}"


def _same_address(a: str, b: str) -> bool:
    # Both are normalised already (domains lower-case Unicode). Case is ignored in the local
    # part as every real mailbox provider does; lower() rather than casefold() so that
    # "straße" and "strasse", which are different mailboxes, stay different.
    return a.lower() == b.lower()


# --------------------------------------------------------------------------- domains


def normalize_domain_pattern(p: str) -> str:
    """Validate one allowed-domain pattern and return it in lower-case Unicode form.

    ``ac-lyon.fr`` is an exact domain, ``*.ac-lyon.fr`` any of its subdomains (not the
    domain itself: list both to allow both). Raises :class:`InvalidDomainPattern`.
    """
    return _normalized_pattern(p.strip())


@functools.lru_cache(maxsize=1024)
def _normalized_pattern(pattern: str) -> str:
    def bad(reason: str) -> InvalidDomainPattern:
        return InvalidDomainPattern(pattern=pattern, reason=reason)

    if not pattern:
        raise bad(_R_EMPTY)
    if len(pattern) > 255:
        raise InvalidDomainPattern(pattern=pattern[:40] + "…", reason=_R_DOMAIN_TOO_LONG)
    if any(c.isspace() or c in _BREAKS for c in pattern):
        raise bad(_R_SPACE)
    # "http://x", "x:25", "x/y": a web address or a host with a port pasted by mistake.
    if "/" in pattern or ":" in pattern or "\\" in pattern:
        raise bad(_R_URL)
    if "@" in pattern:
        raise bad(_R_AT)
    try:
        # UTS 46 mapping folds case and width and maps ideographic full stops to dots, so
        # what the administrator sees and what a mail server sees are the same name; the
        # checks below then run on what will really be used.
        mapped = idna.uts46_remap(pattern, std3_rules=False, transitional=False)
    except idna.IDNAError:
        raise bad(_R_IDNA) from None
    if mapped in ("*", "*."):
        raise bad(_R_WILDCARD_ALONE)
    wildcard = mapped.startswith("*.")
    rest = mapped[2:] if wildcard else mapped
    if "*" in rest:
        raise bad(_R_WILDCARD_PLACE)
    if rest.endswith("."):
        raise bad(_R_TRAILING_DOT)
    if rest.startswith("."):
        raise bad(_R_LEADING_DOT)
    labels = rest.split(".")
    if "" in labels:
        raise bad(_R_EMPTY_LABEL)
    ascii_labels = [_ascii_label(label, bad) for label in labels]
    ascii_name = ".".join(ascii_labels)
    if len(ascii_name) > 253:
        raise bad(_R_DOMAIN_TOO_LONG)
    unicode_name = ".".join(
        label if not label.startswith("xn--") else idna.decode(label) for label in ascii_labels
    )
    return ("*." if wildcard else "") + unicode_name


def _ascii_label(label: str, bad: Callable[[str], InvalidDomainPattern]) -> str:
    if label.isascii():
        if not _LDH.fullmatch(label):
            raise bad(_R_ASCII_CHARS)
        if len(label) > 63:
            raise bad(_R_LABEL_TOO_LONG)
        if label.startswith("-") or label.endswith("-"):
            raise bad(_R_HYPHEN)
        if label.startswith("xn--"):
            # An A-label typed as is must decode to a valid U-label.
            try:
                idna.decode(label)
            except idna.IDNAError:
                raise bad(_R_IDNA) from None
        return label
    # Punycode length decides the 63-octet limit, and it can be checked before idna runs,
    # so the administrator is told the real problem rather than a generic one.
    try:
        punycode = label.encode("punycode")
    except UnicodeError:
        raise bad(_R_IDNA) from None
    if len(punycode) + 4 > 63:
        raise bad(_R_LABEL_TOO_LONG)
    if label.startswith("-") or label.endswith("-"):
        raise bad(_R_HYPHEN)
    try:
        return idna.alabel(label).decode("ascii")
    except idna.IDNAError:
        raise bad(_R_IDNA) from None


@functools.lru_cache(maxsize=1024)
def _pattern_key(pattern: str) -> tuple[bool, str]:
    """(is_wildcard, ASCII domain) of a pattern, for matching."""
    normal = normalize_domain_pattern(pattern)
    if normal.startswith("*."):
        return True, _ascii_domain(normal[2:])
    return False, _ascii_domain(normal)


def matching_pattern(address: str, patterns: Sequence[str]) -> str | None:
    """The first of ``patterns`` that the domain of ``address`` matches, else ``None``.

    Case and IDNA form are ignored. A pattern that is not valid raises
    :class:`InvalidDomainPattern` rather than being skipped, so a broken setting is
    reported instead of silently changing senders.
    """
    _, at, domain = address.rpartition("@")
    if not at or not domain:
        return None
    try:
        target = _ascii_domain(domain)
    except (idna.IDNAError, UnicodeError):
        return None  # a domain with no IDNA form can match nothing
    for pattern in patterns:
        wildcard, suffix = _pattern_key(pattern)
        if wildcard:
            if target.endswith("." + suffix):
                return pattern
        elif target == suffix:
            return pattern
    return None


# --------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class SenderDecision:
    """What an e-mail leaves with, and why.

    ``user_address`` is the address the rule was applied to: the user's own address, or
    the granted address they asked to send as. ``matched_pattern`` is the allowed-domain
    pattern that matched (``None`` outside the allowed domains).
    """

    from_name: str
    from_address: str
    reply_to: tuple[str, ...]
    envelope_from: str
    rule: Rule
    user_address: str
    matched_pattern: str | None
    allowed_domains: tuple[str, ...]

    def __post_init__(self) -> None:
        # A decision may be built by hand (tests, previews); whatever its origin, none of
        # these values may carry a line break into a header or an SMTP command.
        values = [self.from_name, self.from_address, self.envelope_from, self.user_address]
        values.extend(self.reply_to)
        for value in values:
            if not _BREAKS.isdisjoint(value):
                raise ValueError(f"line break or NUL in sender decision value {value!r}")

    @property
    def formatted_from(self) -> str:
        """The From as people read it, e.g. ``Collège Jean Moulin <ne-pas-repondre@ac-lyon.fr>``.

        Quoted as RFC 5322 requires when the name has special characters; it cannot hold a
        line break (checked at construction).
        """
        if not self.from_name:
            return self.from_address
        local, _, domain = self.from_address.rpartition("@")
        return str(Address(display_name=self.from_name, username=local, domain=domain))

    def explain(self, lang: str = "en") -> str:
        """One sentence, in ``lang``, saying which sender is used and why."""
        reply_to = ", ".join(self.reply_to)
        if self.rule == "inside_allowed":
            template = _EXPLAIN_INSIDE_REPLY if self.reply_to else _EXPLAIN_INSIDE
            return translate(
                lang,
                template,
                address=self.user_address,
                pattern=self.matched_pattern or "",
                reply_to=reply_to,
            )
        if self.rule == "outside_allowed":
            template = (
                _EXPLAIN_OUTSIDE_ONE if len(self.allowed_domains) == 1 else _EXPLAIN_OUTSIDE_MANY
            )
            return translate(
                lang,
                template,
                address=self.user_address,
                domains=", ".join(self.allowed_domains),
                sender=self.formatted_from,
                reply_to=reply_to,
            )
        if self.rule == "unverified_sender":
            return translate(lang, _EXPLAIN_UNVERIFIED, address=self.user_address,
                             sender=self.formatted_from, reply_to=reply_to)
        return translate(lang, _EXPLAIN_NO_DOMAINS, sender=self.formatted_from, reply_to=reply_to)


def clean_display_name(name: str) -> str:
    """A display name with every run of spaces, line breaks or control characters turned
    into one space, trimmed."""
    return _NAME_JUNK.sub(" ", name).strip()


def _normalize_field(value: str, field: str) -> str:
    try:
        return normalize_address(value)
    except InvalidAddress as exc:
        exc.field = field
        raise


def decide_sender(
    *,
    user_address: str,
    user_name: str,
    allowed_domains: Sequence[str],
    establishment_name: str,
    establishment_address: str,
    requested_from: str | None = None,
    message_reply_to: Sequence[str] = (),
    granted_addresses: Sequence[str] = (),
    verified_addresses: Sequence[str] | None = None,
    display: str = "establishment",
) -> SenderDecision:
    """Apply the sender policy for one user and one message.

    ``display`` is how the establishment's sender is named when it is used: by the
    establishment's name (``establishment``), or ``user_via``, "Bob Durand via Collège
    Jean Moulin", so that recipients still see who wrote (see :func:`via_name`).

    ``verified_addresses`` is ``None`` when the establishment does not ask for sender
    verification. Otherwise an address inside the allowed domains is used as is only when
    it is one of them; if not, it is treated as an address outside the allowed domains
    (rule ``unverified_sender``). Verification never lets an address outside the allowed
    domains through: those domains are what the relay may send for (SPF, DKIM, DMARC), and
    owning a mailbox does not change that.

    Raises :class:`SenderForbidden` when ``requested_from`` is neither the user's address
    nor one granted to them, :class:`SenderNotConfigured` when the establishment's sender
    is needed but not set, :class:`InvalidAddress` for a malformed address.
    """
    own = _normalize_field(user_address, "user_address")
    address = own
    if requested_from is not None and requested_from.strip():
        address = sendable(own, requested_from, granted_addresses, field="from")

    reply_to = dedupe_addresses(
        _normalize_field(value, f"reply_to.{index}") for index, value in enumerate(message_reply_to)
    )
    domains = tuple(normalize_domain_pattern(p) for p in allowed_domains)
    pattern = matching_pattern(address, domains) if domains else None

    unverified = (
        pattern is not None
        and verified_addresses is not None
        and not any(_same_address(address, v) for v in verified_addresses)
    )
    if pattern is not None and not unverified:
        return SenderDecision(
            from_name=clean_display_name(user_name),
            from_address=address,
            reply_to=reply_to,
            envelope_from=address,
            rule="inside_allowed",
            user_address=address,
            matched_pattern=pattern,
            allowed_domains=domains,
        )

    if not establishment_address.strip():
        raise SenderNotConfigured(address=address, hint=_HINT_SET_SENDER)
    sender = _normalize_field(establishment_address, "sender.address")
    return SenderDecision(
        from_name=via_name(user_name, establishment_name, sender) if display == USER_VIA
        else clean_display_name(establishment_name),
        from_address=sender,
        # The user's own address goes to Reply-To so that answers reach them even though
        # the From is the establishment's.
        reply_to=reply_to or (address,),
        # The envelope follows the From so that SPF/DMARC align with the relay's domain.
        envelope_from=sender,
        rule="unverified_sender" if unverified
        else "outside_allowed" if domains else "no_allowed_domains",
        user_address=address,
        matched_pattern=None,
        allowed_domains=domains,
    )


USER_VIA = "user_via"
VIA = "via"  # the same word in French and English, as Moodle and Odoo write it


def via_name(user_name: str, establishment_name: str, establishment_address: str) -> str:
    """The display name "<user> via <establishment>" (the establishment's sender domain
    when it has no name); the establishment's name alone when the user has none."""
    user = clean_display_name(user_name)
    establishment = (clean_display_name(establishment_name)
                     or establishment_address.rpartition("@")[2])
    if not user:
        return clean_display_name(establishment_name)
    return f"{user} {VIA} {establishment}"


def sendable(
    own: str, requested: str, granted_addresses: Sequence[str], *, field: str = "from",
    template: str | None = None,
) -> str:
    """``requested`` in normal form when the user whose address is ``own`` may send as it
    (it is theirs, or granted to them); :class:`SenderForbidden` otherwise."""
    address = _normalize_field(requested, field)
    if not _same_address(address, own):
        granted = _normalized_granted(tuple(granted_addresses))
        if not any(_same_address(address, g) for g in granted):
            raise SenderForbidden(template, address=address, own=own, field=field)
    return address


@functools.lru_cache(maxsize=256)
def _normalized_granted(granted: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for value in granted:
        try:
            out.append(normalize_address(value))
        except InvalidAddress:
            # A malformed grant can grant nothing; it must not block the user's own sending.
            continue
    return tuple(out)


def dedupe_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    """The same mailbox written with other case once only (RFC 5321 leaves local-part case
    to the receiving server, and in practice none distinguishes it); order kept."""
    seen: set[str] = set()
    out: list[str] = []
    for address in addresses:
        key = address.lower()
        if key not in seen:
            seen.add(key)
            out.append(address)
    return tuple(out)
