"""Domains belong to one establishment of an installation that hosts several.

A domain is held, with all its sub-domains, by the establishment that has it first: in
its allowed domains (``ac-lyon.fr`` or ``*.ac-lyon.fr``), as its sender address's domain,
or with a DKIM key. Another establishment cannot take it, nor a part of it, by any door
(allowed domains, sender address, DKIM key, addresses granted to its users, verified
sender addresses): :class:`DomainTaken`, a 409 that names the domain asked for and never
who holds it. Only an operator moves a domain between establishments (:meth:`Domains.move`).
The platform's sender domain (``POSTIER_PLATFORM_SENDER_DOMAIN``) is the platform's: an
establishment's only address there is its own ``<slug>@<domain>``.

Holders are found by reading every establishment's settings and DKIM keys when something
is claimed: claims are rare (a settings save, a key, a grant, a verification code) and
delivery never asks. Two saves racing for the same free domain may both succeed;
``postier doctor`` reports such overlaps (and those made before this rule) to the operator.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from postier.core import policy
from postier.core.installation import Installation
from postier.core.settings import DeliverySettings
from postier.errors import Conflict, Forbidden, InvalidInput, NotFound
from postier.i18n import N_
from postier.store.base import Establishment, User

ALLOWED, SENDER, DKIM = "allowed_domains", "sender", "dkim"

_ASK_OPERATOR = N_(
    "If this domain is your establishment's, ask the installation's operator to move it to "
    "your establishment."
)


class DomainTaken(Conflict):
    code = "domain_taken"
    default_template = N_(
        "The domain {domain} already belongs, in whole or in part, to another establishment "
        "of this installation."
    )


class PlatformDomain(Conflict):
    code = "platform_domain"
    default_template = N_(
        "{domain} is the hosting platform's domain: your establishment's only address there "
        "is {own}."
    )


_PLATFORM_HINT = N_("Use {own}, or an address of your establishment's own domain.")
_TOP_LEVEL = N_("{domain} is a whole top-level domain: in an installation shared by several "
                "establishments, it cannot belong to one of them.")
_TOP_LEVEL_HINT = N_("Enter your establishment's own domain, for example ac-lyon.fr.")


@dataclass(frozen=True)
class Holding:
    """One way an establishment holds a domain (and its sub-domains)."""

    establishment_id: int
    domain: str  # ASCII, lower-case, without "*."
    shown: str  # as the establishment wrote it
    kind: str  # ALLOWED, SENDER or DKIM


@dataclass(frozen=True)
class Claim:
    """Something an establishment is about to take: a domain pattern or an address."""

    field: str
    shown: str
    domain: str  # ASCII, lower-case, without "*."
    address: str | None = None


def ascii_base(pattern: str) -> str | None:
    """The domain a pattern or an address's domain stands for, in ASCII; None when it is
    not a domain (a damaged setting holds nothing)."""
    try:
        normal = policy.normalize_domain_pattern(pattern)
        return policy.ascii_domain(normal.removeprefix("*."))
    except (InvalidInput, ValueError, UnicodeError):
        return None


def within(domain: str, parent: str) -> bool:
    """``domain`` is ``parent`` or one of its sub-domains (both ASCII)."""
    return domain == parent or domain.endswith("." + parent)


def related(a: str, b: str) -> bool:
    """One of the two domains contains the other: whoever holds one holds a part of the
    other."""
    return within(a, b) or within(b, a)


def address_domain(address: str) -> str:
    return address.rpartition("@")[2]


def doc_holdings(establishment_id: int, doc: dict[str, Any]) -> list[Holding]:
    """What a stored settings document holds."""
    out: list[Holding] = []
    patterns = doc.get("allowed_domains")
    for pattern in patterns if isinstance(patterns, list) else []:
        base = ascii_base(str(pattern))
        if base:
            out.append(Holding(establishment_id, base, str(pattern), ALLOWED))
    sender = doc.get("sender")
    address = str(sender.get("address") or "") if isinstance(sender, dict) else ""
    base = ascii_base(address_domain(address)) if "@" in address else None
    if base:
        out.append(Holding(establishment_id, base, address_domain(address), SENDER))
    return out


def all_holdings(docs: dict[int, dict[str, Any]],
                 dkim: Iterable[tuple[int, str]]) -> list[Holding]:
    out = [h for est_id, doc in sorted(docs.items()) for h in doc_holdings(est_id, doc)]
    for est_id, domain in dkim:
        base = ascii_base(domain)
        if base:
            out.append(Holding(est_id, base, domain, DKIM))
    return out


def overlaps(holdings: Sequence[Holding]) -> dict[str, set[int]]:
    """Domains held by more than one establishment: the widest domain of each overlap and
    the establishments that hold it or a part of it."""
    found: dict[str, set[int]] = {}
    for a in holdings:
        for b in holdings:
            if a.establishment_id != b.establishment_id and within(b.domain, a.domain):
                found.setdefault(a.domain, set()).update((a.establishment_id,
                                                          b.establishment_id))
    # An overlap inside a wider one is the same story: reported once, at the widest.
    return {d: ids for d, ids in found.items()
            if not any(other != d and within(d, other) for other in found)}


def pattern_claims(before: Sequence[str], after: Sequence[str]) -> list[Claim]:
    """The allowed domains ``after`` adds to ``before``."""
    old = set(before)
    out = []
    for index, pattern in enumerate(after):
        base = ascii_base(pattern)
        if pattern not in old and base:
            out.append(Claim(f"allowed_domains.{index}", pattern, base))
    return out


def address_claims(addresses: Iterable[str], field: str, before: Iterable[str] = (),
                   indexed: bool = False) -> list[Claim]:
    """The addresses not in ``before``, as claims on their domains (``field.<index>``
    when ``indexed``)."""
    old = {a.lower() for a in before}
    out = []
    for index, address in enumerate(addresses):
        base = ascii_base(address_domain(address)) if "@" in address else None
        if address.lower() not in old and base:
            out.append(Claim(f"{field}.{index}" if indexed else field,
                             address_domain(address), base, address))
    return out


def settings_claims(before: DeliverySettings, after: DeliverySettings) -> list[Claim]:
    """What a settings change newly takes: allowed domains, the sender address and the
    bounce address."""
    claims = pattern_claims(before.allowed_domains, after.allowed_domains)
    if after.sender.address:
        claims += address_claims([after.sender.address], "sender.address",
                                 [before.sender.address])
    if after.bounces.address:
        claims += address_claims([after.bounces.address], "bounces.address",
                                 [before.bounces.address])
    return claims


@dataclass
class MoveReport:
    """What an operator's move changed."""

    domain: str
    to: str
    sources: list[str]
    allowed_domains: list[str]
    dkim: list[str]
    sender_cleared: list[str]
    grants_removed: int

    def as_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "to": self.to, "from": self.sources,
                "allowed_domains": self.allowed_domains, "dkim": self.dkim,
                "sender_cleared": self.sender_cleared, "grants_removed": self.grants_removed}


class Domains:
    """Who holds which domain in this installation (``core.domains``)."""

    def __init__(self, installation: Installation) -> None:
        self.installation = installation

    async def holdings(self) -> list[Holding]:
        store = self.installation.store
        return all_holdings(await store.all_settings(), await store.all_dkim_domains())

    def _platform(self) -> str | None:
        return ascii_base(self.installation.config.platform_sender_domain or "") or None

    async def check(self, establishment_id: int, claims: Sequence[Claim]) -> None:
        """Refuse (409) a claim on the platform's domain, other than the establishment's
        own address there, or on a domain another establishment holds."""
        if not claims:
            return
        wide = next((c for c in claims if "." not in c.domain), None)
        if wide is not None and len(await self.installation.store.list_establishments()) > 1:
            # "fr" or "*.fr" first would keep every other establishment out of a whole
            # top-level domain.
            raise InvalidInput(_TOP_LEVEL, hint=_TOP_LEVEL_HINT, field=wide.field,
                               domain=wide.shown)
        platform = self._platform()
        for claim in claims:
            if platform and related(claim.domain, platform):
                est = await self.installation.establishment(establishment_id)
                domain = self.installation.config.platform_sender_domain
                own = f"{est.slug if est else '?'}@{domain}"
                if (claim.address or "").lower() != own.lower():
                    raise PlatformDomain(hint=_PLATFORM_HINT, field=claim.field,
                                         domain=claim.shown, own=own)
        others = [h for h in await self.holdings() if h.establishment_id != establishment_id]
        for claim in claims:
            if platform and claim.address and within(claim.domain, platform):
                continue  # its own platform address, checked above
            if any(related(claim.domain, h.domain) for h in others):
                raise DomainTaken(hint=_ASK_OPERATOR, field=claim.field, domain=claim.shown)

    async def check_grants(self, establishment_id: int, addresses: Sequence[str],
                           user: User) -> None:
        """Refuse granting ``user`` a new address at a domain another establishment holds."""
        await self.check(establishment_id, address_claims(
            addresses, "granted_senders", user.granted_senders, indexed=True))

    # -- the operator's move -------------------------------------------------------------
    async def move(self, actor: User, domain: str, to: str) -> MoveReport:
        """Give ``domain`` (with its sub-domains) to the establishment ``to``: taken from
        every other establishment that holds it or a part of it (allowed domains, sender
        address, DKIM keys — which move with it — and addresses granted to its users),
        added to ``to``'s allowed domains. Audited in every establishment concerned."""
        if not actor.is_operator:
            raise Forbidden(N_("Only an operator of the installation may move a domain "
                               "between establishments."))
        shown = policy.normalize_domain_pattern(domain)
        key = ascii_base(shown)
        if shown.startswith("*.") or key is None:
            raise InvalidInput(N_("Name the domain itself (for example ac-lyon.fr): its "
                                  "sub-domains move with it."), field="domain")
        platform = self._platform()
        if platform and related(key, platform):
            raise Conflict(N_("{domain} is the hosting platform's domain: it belongs to no "
                              "establishment."), field="domain", domain=shown)
        target = await self.installation.establishment(to.strip().lower())
        if target is None:
            raise NotFound(N_("There is no establishment {slug} for you."), slug=to)
        held = [h for h in await self.holdings()
                if h.establishment_id != target.id and related(h.domain, key)]
        wider = next((h for h in held if not within(h.domain, key)), None)
        if wider is not None:
            raise Conflict(N_("{domain} is held as part of {parent}: move {parent} itself."),
                           field="domain", domain=shown, parent=wider.shown)
        report = MoveReport(shown, target.slug, [], [], [], [], 0)
        for source_id in sorted({h.establishment_id for h in held}):
            await self._take(actor, source_id, target, key, report)
        await self._give(actor, target, shown, key, report)
        return report

    async def _take(self, actor: User, source_id: int, target: Establishment, key: str,
                    report: MoveReport) -> None:
        installation = self.installation
        source = await installation.establishment(source_id)
        settings = await installation.stored_settings(source_id, fresh=True)
        keep = [p for p in settings.allowed_domains if not within(ascii_base(p) or "", key)]
        moved = [p for p in settings.allowed_domains if p not in keep]
        sender = settings.sender
        cleared = bool(sender.address) and within(
            ascii_base(address_domain(sender.address)) or "", key)
        if moved or cleared:
            update: dict[str, Any] = {"allowed_domains": keep}
            if cleared:
                update["sender"] = sender.model_copy(update={"address": ""})
            await installation.replace_settings(source_id, settings.model_copy(update=update))
        dkim = [d for e, d in await installation.store.all_dkim_domains()
                if e == source_id and within(ascii_base(d) or "", key)]
        for domain in dkim:
            await installation.store.move_dkim_key(source_id, target.id, domain)
        installation.forget_dkim(source_id, target.id)
        grants = 0
        for user in await installation.store.list_users(source_id):
            left = [a for a in user.granted_senders
                    if not within(ascii_base(address_domain(a)) or "", key)]
            if len(left) != len(user.granted_senders):
                grants += len(user.granted_senders) - len(left)
                await installation.store.update_user(user.id, granted_senders=left)
        if grants:
            installation.forget_tokens()
        slug = source.slug if source else str(source_id)
        report.sources.append(slug)
        report.allowed_domains += [p for p in moved if p not in report.allowed_domains]
        report.dkim += dkim
        if cleared:
            report.sender_cleared.append(slug)
        report.grants_removed += grants
        # The other establishment is not named: each one's audit log is its own.
        await installation.store.audit(source_id, actor.username, "domain.move_out", report.domain,
                               {"allowed_domains": moved, "dkim": dkim,
                                "sender_cleared": cleared, "grants_removed": grants})

    async def _give(self, actor: User, target: Establishment, shown: str, key: str,
                    report: MoveReport) -> None:
        installation = self.installation
        settings = await installation.stored_settings(target.id, fresh=True)
        added = report.allowed_domains or [shown]
        patterns = list(dict.fromkeys([*settings.allowed_domains, *added]))
        if patterns != settings.allowed_domains:
            await installation.replace_settings(
                target.id, settings.model_copy(update={"allowed_domains": patterns}))
        await installation.store.audit(target.id, actor.username, "domain.move_in", report.domain,
                               {"allowed_domains": added, "dkim": report.dkim})
