"""The domain check of an establishment (:mod:`postier.ops.domain_check`) with what it
sends with: its relay, the DKIM key Postier signs the domain's e-mails with, and its
return path (the bounce address's domain, else the sender's). Asked by administrators
(HTTP API, settings page) and by ``postier doctor``."""

from __future__ import annotations

from typing import Any

from postier.core.accounts import require_admin
from postier.core.service import Postier
from postier.core.settings import DeliverySettings, RelayKind
from postier.errors import InvalidSetting
from postier.i18n import N_
from postier.ops.domain_check import DkimKey, check_domain, dns_servers
from postier.store.base import User


def configured_servers(core: Postier) -> list[tuple[str, int]] | None:
    """``POSTIER_DNS_SERVERS``, or ``None`` for the system's resolvers."""
    try:
        servers = dns_servers(core.config.dns_servers)
    except ValueError as exc:
        raise InvalidSetting(N_("POSTIER_DNS_SERVERS is not a list of DNS servers "
                                "(host:port, comma-separated): {reason}"),
                             reason=str(exc)) from exc
    return servers or None


async def check_sending(domain: str, settings: DeliverySettings, key: DkimKey | None, *,
                        servers: list[tuple[str, int]] | None, lang: str,
                        timeout: float = 3.0) -> dict[str, Any]:  # noqa: ASYNC109 - per query
    """The check of ``domain`` as e-mails sent with ``settings`` and signed with ``key``
    meet it: the relay's host, the return path's domain (the bounce address's, else the
    sender's) for SPF."""
    domain = domain.strip().strip(".").lower()
    return_path = settings.bounces.address or settings.sender.address
    envelope = return_path.rpartition("@")[2].lower() or None
    relay = settings.relay
    return await check_domain(
        domain,
        relay_host=relay.host or None if relay.kind == RelayKind.SMTP else None,
        dkim=key, envelope_domain=envelope if envelope and envelope != domain else None,
        servers=servers, lang=lang, timeout=timeout)


async def check_for(core: Postier, establishment_id: int, domain: str, lang: str
                    ) -> dict[str, Any]:
    """The check of ``domain`` as the establishment's e-mails would meet it."""
    settings = await core.delivery_settings(establishment_id)
    key = (await core.dkim.keys(establishment_id)).get(domain.strip().strip(".").lower())
    return await check_sending(
        domain, settings, DkimKey(key.selector, key.public_b64) if key is not None else None,
        servers=configured_servers(core), lang=lang)


async def establishment_check(core: Postier, user: User, domain: str, lang: str
                              ) -> dict[str, Any]:
    """Administrators: the check of ``domain`` for their establishment."""
    require_admin(user)
    return await check_for(core, user.establishment_id, domain, lang)
