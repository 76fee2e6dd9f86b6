"""What an administrator must know about a relay's settings, though nothing is refused: a
password sent without encryption, an OAuth2 client secret or certificate about to expire."""

from __future__ import annotations

import datetime
from typing import Any

from postier.core.settings import AuthMethod, DeliverySettings, RelayKind, RelaySettings, Security
from postier.i18n import N_, translate

CLEARTEXT_WARNING = N_(
    "The sign-in to this SMTP server travels without encryption (security: none): anyone "
    "on the network between them can read the password. Choose STARTTLS or SSL/TLS."
)


def settings_warnings(settings: DeliverySettings, lang: str = "en") -> list[str]:
    """What the administrator must know about the relays: a password sent without
    encryption, an OAuth2 client secret or certificate about to expire (the backup
    relay's prefixed as such)."""
    out = relay_warnings(settings.relay, lang)
    if settings.backup_relay is not None:
        out += [translate(lang, N_("Backup relay: {warning}"), warning=w)
                for w in relay_warnings(settings.backup_relay, lang)]
    return out


def relay_warnings(relay: RelaySettings, lang: str = "en") -> list[str]:
    """One relay's (or sending profile's) warnings: its sign-in sent without encryption;
    an OAuth2 client secret or certificate about to expire, or e-mails stop leaving."""
    out: list[str] = []
    if cleartext_sign_in(relay.kind, relay.security, relay.auth):
        out.append(translate(lang, CLEARTEXT_WARNING))
    for kind, date in relay.oauth2_expiries():
        if date - datetime.date.today() > datetime.timedelta(days=30):
            continue
        if kind == "certificate":
            out.append(translate(lang, N_(
                "The OAuth2 certificate expires on {date}: register a new one on the "
                "application in Entra ID and paste it here with its key before then, or "
                "e-mails will stop leaving."), date=date.isoformat()))
        else:
            out.append(translate(lang, N_(
                "The OAuth2 client secret expires on {date}: renew it before then, or "
                "e-mails will stop leaving."), date=date.isoformat()))
    return out


def cleartext_sign_in(kind: str, security: str, auth: str) -> bool:
    """A password (or OAuth2 token) would travel in clear to an SMTP server."""
    return kind == RelayKind.SMTP and security == Security.NONE and auth != AuthMethod.NONE


def profile_warnings(profile: dict[str, Any], lang: str = "en") -> list[str]:
    """A sending profile's warnings, from its public form (workstations sign in with it)."""
    if cleartext_sign_in(str(profile.get("kind", "smtp")), str(profile.get("security")),
                         str(profile.get("auth", "none"))):
        return [translate(lang, CLEARTEXT_WARNING)]
    return []
