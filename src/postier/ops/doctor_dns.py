"""``postier doctor``'s domain check: for each establishment that sends, the DNS of its
sender's domain (SPF, DKIM, DMARC: :mod:`postier.ops.sending_domain`), as receivers will
read it. A few domains are checked at a time, each within a few seconds, so a hosted
installation's hundreds of schools do not hold the doctor for long."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from postier.core.settings import DeliverySettings
from postier.i18n import N_, translate
from postier.ops.doctor_checks import FAIL, OK, WARN, Check
from postier.ops.domain_check import DkimKey, dns_servers
from postier.ops.sending_domain import check_sending
from postier.store.base import Store

AT_ONCE = 8
TIMEOUT = 3.0
_ITEMS = ("spf", "dkim", "dmarc")
LABEL = N_("DNS of {domain} ({establishment})")

# (establishment id, short name, hosted, its settings or why they cannot be read)
Establishments = Sequence[tuple[int, str, bool, DeliverySettings | str]]


async def domain_checks(store: Store, establishments: Establishments, servers_setting: str,
                        lang: str) -> list[Check]:
    """One check per establishment that sends centrally from an address of its own."""
    try:
        servers = dns_servers(servers_setting) or None
    except ValueError as exc:
        return [Check("dns", translate(lang, N_("DNS servers")), FAIL, str(exc),
                      translate(lang, N_("Correct POSTIER_DNS_SERVERS (host:port, "
                                         "comma-separated).")))]
    gate = asyncio.Semaphore(AT_ONCE)

    async def one(est_id: int, slug: str, settings: DeliverySettings) -> Check:
        domain = settings.sender.address.rpartition("@")[2].lower()
        label = translate(lang, LABEL, domain=domain, establishment=slug)
        keys = {k["domain"]: k for k in await store.list_dkim_keys(est_id)}
        key = keys.get(domain)
        async with gate:
            try:
                got = await check_sending(
                    domain, settings,
                    DkimKey(key["selector"], key["public_key"]) if key else None,
                    servers=servers, lang=lang, timeout=TIMEOUT)
            except Exception as exc:  # a domain the DNS check refuses: said, not raised
                return Check("dns", label, WARN, str(exc))
        bad = [name for name in _ITEMS if not got[name]["ok"]]
        text = "\n".join(f"{name.upper()}: {got[name]['hint']}" for name in _ITEMS)
        return Check("dns", label, WARN if bad else OK, text,
                     "\n".join(f"{name.upper()}: {got[name]['expected']}" for name in bad
                               if got[name]["expected"]) or None)

    return list(await asyncio.gather(*(
        one(est_id, slug, settings) for est_id, slug, _hosted, settings in establishments
        if isinstance(settings, DeliverySettings) and settings.delegation
        and settings.sender.address)))
