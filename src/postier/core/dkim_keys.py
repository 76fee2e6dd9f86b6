"""The establishments' DKIM keys: made and removed by an administrator (audited), read
(decrypted, briefly cached) to sign e-mails at delivery. The signing itself is
:mod:`postier.core.dkim_signing`."""

from __future__ import annotations

import asyncio

from postier.core import dkim_signing, policy
from postier.core.accounts import require_admin
from postier.core.dkim_signing import DkimKey
from postier.core.domains import Domains, address_claims
from postier.core.installation import Installation
from postier.errors import InvalidInput, NotFound
from postier.i18n import N_
from postier.store.base import User


class DkimKeys:
    """Each establishment's DKIM keys, one per domain."""

    def __init__(self, installation: Installation, domains: Domains) -> None:
        self.installation = installation
        self.store = installation.store
        self.domains = domains

    async def keys(self, establishment_id: int) -> dict[str, DkimKey]:
        secrets = self.installation.secrets

        async def load() -> dict[str, DkimKey]:
            return {
                row["domain"]: DkimKey(row["domain"], row["selector"],
                                       secrets.decrypt(row["private_key_enc"]).encode(),
                                       row["public_key"])
                for row in await self.store.list_dkim_keys(establishment_id)
            }

        return await self.installation.dkim_cache.get(establishment_id, load)

    async def generate(self, user: User, domain: str, selector: str = "postier") -> DkimKey:
        """Make (or replace) the DKIM key of one of the establishment's domains."""
        require_admin(user)
        try:
            domain = policy.normalize_domain_pattern(domain)
        except InvalidInput as exc:
            exc.field = "domain"
            raise
        settings = await self.installation.stored_settings(user.establishment_id)
        own = {settings.sender.address.rpartition("@")[2].lower()} - {""}
        if domain.startswith("*.") or not (
            domain in own or policy.matching_pattern(f"x@{domain}", settings.allowed_domains)
        ):
            raise InvalidInput(
                N_("{domain} is neither an allowed domain nor the domain of the sender "
                   "address: Postier would never sign for it."),
                hint=N_("Add it to the allowed domains first."), field="domain", domain=domain,
            )
        # Signing d=<domain> speaks for the domain: only its holder may.
        await self.domains.check(user.establishment_id,
                                 address_claims([f"x@{domain}"], "domain"))
        selector = selector.strip().lower()
        if not dkim_signing.valid_selector(selector):
            raise InvalidInput(N_("A selector is made of letters, digits and hyphens."),
                               field="selector")
        key = await asyncio.to_thread(dkim_signing.generate, domain, selector)
        await self.store.save_dkim_key(user.establishment_id, domain, selector,
                                       self.installation.secrets.encrypt(
                                           key.private_pem.decode()),
                                       key.public_b64)
        self.installation.forget_dkim(user.establishment_id)
        await self.store.audit(user.establishment_id, user.username, "dkim.generate", domain,
                               {"selector": selector})
        return key

    async def remove(self, user: User, domain: str) -> str:
        """Stop signing for one of the establishment's domains (its key is deleted); the
        domain as stored."""
        require_admin(user)
        try:  # as generate() stored it: "xn--…" or any case of the Unicode form
            domain = policy.normalize_domain_pattern(domain)
        except InvalidInput:
            domain = domain.strip().lower()  # not a domain: found nowhere, said so below
        if not await self.store.delete_dkim_key(user.establishment_id, domain):
            raise NotFound(N_("There is no DKIM key for {domain}."), domain=domain)
        self.installation.forget_dkim(user.establishment_id)
        await self.store.audit(user.establishment_id, user.username, "dkim.remove", domain, {})
        return domain

    async def sign(self, establishment_id: int, data: bytes) -> bytes:
        """Sign stored bytes when the From's domain has a key (at delivery)."""
        keys = await self.keys(establishment_id)
        if not keys:
            return data
        domain = dkim_signing.from_domain(data)
        key = keys.get(domain or "")
        if key is None:
            return data
        return await asyncio.to_thread(dkim_signing.sign, data, key)
