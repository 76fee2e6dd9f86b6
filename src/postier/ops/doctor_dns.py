"""``postier doctor``'s domain check: for each establishment that sends, the DNS of its
sender's domain (SPF, DKIM, DMARC: :mod:`postier.ops.domain_check`), as receivers will
read it. A few domains are checked at a time, each within a few seconds, so a hosted
installation's hundreds of schools do not hold the doctor for long."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from postier.i18n import N_, translate
from postier.ops.doctor_checks import FAIL, OK, WARN, Check
from postier.ops.domain_check import DkimKey, check_domain, dns_servers
from postier.store.base import Store

AT_ONCE = 8
TIMEOUT = 3.0
_ITEMS = ("spf", "dkim", "dmarc")


def _sending(doc: str | None) -> tuple[str, str, str | None] | None:
    """(sender's domain, return path's domain, relay host) of a stored settings document
    whose establishment sends centrally with a sender address; else None."""
    try:
        data: dict[str, Any] = json.loads(doc or "{}")
        sender = str((data.get("sender") or {}).get("address") or "")
        bounce = str((data.get("bounces") or {}).get("address") or "")
        relay = data.get("relay") or {}
    except (ValueError, AttributeError):
        return None
    if not sender or data.get("delegation") is False:
        return None
    domain = sender.rpartition("@")[2].lower()
    host = str(relay.get("host") or "") if relay.get("kind", "smtp") == "smtp" else ""
    return domain, (bounce or sender).rpartition("@")[2].lower(), host or None


async def domain_checks(store: Store, servers_setting: str, lang: str) -> list[Check]:
    """One check per establishment that sends from a domain of its own."""
    label = N_("DNS of {domain} ({establishment})")
    try:
        servers = dns_servers(servers_setting) or None
    except ValueError as exc:
        return [Check("dns", translate(lang, N_("DNS servers")), FAIL, str(exc),
                      translate(lang, N_("Correct POSTIER_DNS_SERVERS (host:port, "
                                         "comma-separated).")))]
    gate = asyncio.Semaphore(AT_ONCE)

    async def one(est_id: int, slug: str, sending: tuple[str, str, str | None]) -> Check:
        domain, envelope, relay = sending
        keys = {k["domain"]: k for k in await store.list_dkim_keys(est_id)}
        key = keys.get(domain)
        async with gate:
            try:
                got = await check_domain(
                    domain, relay_host=relay,
                    dkim=DkimKey(key["selector"], key["public_key"]) if key else None,
                    envelope_domain=envelope if envelope != domain else None,
                    servers=servers, lang=lang, timeout=TIMEOUT)
            except Exception as exc:  # a domain the DNS check refuses: said, not raised
                return Check("dns", translate(lang, label, domain=domain, establishment=slug),
                             WARN, str(exc))
        bad = [name for name in _ITEMS if not got[name]["ok"]]
        text = "\n".join(f"{name.upper()}: {got[name]['hint']}" for name in _ITEMS)
        return Check("dns", translate(lang, label, domain=domain, establishment=slug),
                     WARN if bad else OK, text,
                     "\n".join(f"{name.upper()}: {got[name]['expected']}" for name in bad
                               if got[name]["expected"]) or None)

    work = [(est_id, slug, sending)
            for est_id, slug, _hosted, doc in await store.settings_documents(disabled=False)
            if (sending := _sending(doc)) is not None]
    return list(await asyncio.gather(*(one(*w) for w in work)))
