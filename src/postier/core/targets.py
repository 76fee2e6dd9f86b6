"""Where a hosted establishment's settings may make the platform connect.

A hosted establishment's administrator enters servers the platform then reaches on their
behalf: the relay and the backup relay (or the Postier server they hand e-mails on to),
the OAuth2 token URL, the webhook, the bounce mailbox. Pointed at the platform's own
loopback or private networks, they would let a school's administrator probe or use the
platform's internal services (server-side request forgery). So, for a hosted
establishment, every address such a server's name resolves to (the system resolver, when
the settings are saved or tested) must be a public one: not loopback, private,
link-local, unspecified, multicast or reserved — unless it is in a network the operator
allows (``POSTIER_HOSTED_ALLOWED_NETWORKS``). A school's own installation (an
establishment that is not hosted) keeps every address: its relay is often on its own
network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

from postier.core.settings import RELAY_SECTIONS, AuthMethod, DeliverySettings, RelayKind
from postier.errors import InvalidInput
from postier.i18n import N_

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
RESOLVE_TIMEOUT = 10.0  # seconds: a name that does not resolve by then is not saved

# Why an address is refused, in the order checked (the first that applies is said).
_KINDS: tuple[tuple[str, str], ...] = (
    ("is_loopback", N_("this machine itself (loopback)")),
    ("is_unspecified", N_("an unspecified address")),
    ("is_link_local", N_("a link-local address")),
    ("is_multicast", N_("a multicast address")),
    ("is_private", N_("a private network")),
    ("is_reserved", N_("a reserved address")),
)
_NOT_GLOBAL = N_("an address that is not on the Internet")


class TargetNotAllowed(InvalidInput):
    code = "target_not_allowed"
    default_template = N_(
        "{target} leads to {address}, {reason}: a hosted establishment's servers must be "
        "reachable on the Internet."
    )


_HINT = N_(
    "Enter the server's public name. If the platform must really reach this network, ask "
    "the installation's operator to allow it."
)
_UNKNOWN = N_("{target} cannot be found (DNS): a hosted establishment's servers must be "
              "public names.")
_UNKNOWN_HINT = N_("Check the name, for example smtp.ac-lyon.fr.")


def _url(field: str, url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # a port out of range: no connection will be made
        port = None
    return field, parts.hostname or "", port


def targets(settings: DeliverySettings) -> list[tuple[str, str, int | None]]:
    """(field, host, port) of every server the settings make the platform connect to."""
    out: list[tuple[str, str, int | None]] = []
    for section in RELAY_SECTIONS:
        relay = getattr(settings, section)
        if relay is None:
            continue
        if relay.kind == RelayKind.POSTIER:
            out.append(_url(f"{section}.url", relay.url))
        else:
            out.append((f"{section}.host", relay.host, relay.port))
        if relay.auth == AuthMethod.OAUTH2 and relay.oauth2_token_url:
            out.append(_url(f"{section}.oauth2_token_url", relay.oauth2_token_url))
    if settings.alerts.webhook_url:
        out.append(_url("alerts.webhook_url", settings.alerts.webhook_url))
    imap = settings.bounces.imap
    if imap is not None and imap.host:
        out.append(("bounces.imap.host", imap.host, imap.port))
    return [(field, host.strip("[]").lower(), port) for field, host, port in out if host]


def refusal(address: Address) -> str | None:
    """Why the platform must not connect to ``address`` for a hosted establishment."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        return refusal(mapped)
    for attribute, reason in _KINDS:
        if getattr(address, attribute):
            return reason
    return None if address.is_global else _NOT_GLOBAL


async def resolve(host: str) -> list[Address]:
    """Every address ``host`` stands for, by the system resolver (as the connection will
    find it); an address literal as it is."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = await asyncio.wait_for(
        asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM),
        RESOLVE_TIMEOUT)
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


async def check(after: DeliverySettings, before: DeliverySettings | None,
                allowed: Sequence[Network]) -> None:
    """Refuse (422) a server of ``after`` not in ``before`` (the same host and port) that
    leads to a non-public address outside the ``allowed`` networks."""
    known = set(targets(before)) if before is not None else set()
    for field, host, port in targets(after):
        if (field, host, port) in known:
            continue  # checked when it was saved, or the operator's platform relay
        try:
            addresses = await resolve(host)
        except (OSError, UnicodeError, TimeoutError):
            raise TargetNotAllowed(_UNKNOWN, hint=_UNKNOWN_HINT, field=field,
                                   target=host) from None
        for address in addresses:
            reason = refusal(address)
            if reason and not any(address in network for network in allowed):
                raise TargetNotAllowed(hint=_HINT, field=field, target=host,
                                       address=str(address), reason=reason)
