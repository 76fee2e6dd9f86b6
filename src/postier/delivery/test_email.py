"""The test-send's e-mail: what it says, in the reader's language, about the settings tested.

Its body lists the settings (server, port, security, authentication, username, and the
label of the settings when given, never the password) and whether they are saved yet.
"""

from __future__ import annotations

import datetime as dt
import email.policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

from postier.core.settings import AuthMethod, RelaySettings, Security
from postier.i18n import N_, translate

SECURITY_LABELS: dict[str, str] = {
    Security.NONE.value: N_("none"),
    Security.STARTTLS.value: "STARTTLS",
    Security.TLS.value: N_("TLS (implicit)"),
}

AUTH_LABELS: dict[str, str] = {
    AuthMethod.NONE.value: N_("none"),
    AuthMethod.PASSWORD.value: N_("password"),
    AuthMethod.OAUTH2.value: N_("OAuth2 (XOAUTH2)"),
}


def compose(
    relay: RelaySettings,
    *,
    to: str,
    sender_name: str,
    sender_address: str,
    lang: str,
    label: str,
    unsaved: bool = False,
) -> bytes:
    def t(template: str, **params: Any) -> str:
        return translate(lang, template, **params)

    lines = [t(N_("This is a test e-mail sent by Postier to check the e-mail sending "
                  "settings.")), ""]
    if label:
        lines.append(t(N_("Settings: {label}"), label=label))
    lines += [
        t(N_("SMTP server: {host}"), host=relay.host),
        t(N_("Port: {port}"), port=relay.port),
        t(N_("Security: {security}"), security=t(SECURITY_LABELS[relay.security.value])),
        t(N_("Authentication: {auth}"), auth=t(AUTH_LABELS[relay.auth.value])),
    ]
    if relay.auth == AuthMethod.PASSWORD:
        lines.append(t(N_("Username: {username}"), username=relay.username))
    if unsaved:
        lines += ["", t(N_("If you are reading this, these settings work but are not saved "
                           "yet: click Save in Postier's page, or they will be lost."))]
    else:
        lines += ["", t(N_("If you are reading this, these settings work: nothing else to "
                           "do."))]

    utf8 = not (to.isascii() and sender_address.isascii())
    policy = email.policy.SMTPUTF8 if utf8 else email.policy.SMTP
    msg = EmailMessage(policy=policy)
    msg["Subject"] = t(N_("Postier test e-mail"))
    msg["From"] = _address_header(sender_name, sender_address)
    msg["To"] = to
    msg["Date"] = format_datetime(dt.datetime.now(dt.UTC).astimezone())
    domain = sender_address.rpartition("@")[2] or None
    msg["Message-ID"] = make_msgid("postier-test", domain=_ascii_domain(domain))
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content("\n".join(lines) + "\n", cte="quoted-printable")
    return msg.as_bytes()


def _address_header(name: str, address: str) -> str:
    local, _, domain = address.rpartition("@")
    return str(Address(display_name=name, username=local, domain=domain))


def _ascii_domain(domain: str | None) -> str | None:
    if not domain:
        return None
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
