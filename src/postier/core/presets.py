"""Relay presets: the usual SMTP servers of schools, with their documented sending limits.

A preset fills the server settings (host, port, security, authentication and the sending
limits: per minute, per hour, recipients per day, simultaneous connections);
the administrator can still change everything. Limits are the providers' published
figures, with their source, so an administrator can check them.
"""

from __future__ import annotations

from typing import Any

from postier.i18n import N_, translate

PRESETS: dict[str, dict[str, Any]] = {
    "microsoft365": {
        "label": N_("Microsoft 365 (Exchange Online)"),
        # 3 simultaneous connections per mailbox ("432 4.3.2 Concurrent connections limit
        # exceeded" beyond): https://learn.microsoft.com/exchange/troubleshoot/send-emails/
        # smtp-submission-improvements
        "relay": {"host": "smtp.office365.com", "port": 587, "security": "starttls",
                  "auth": "password", "max_per_minute": 30, "max_per_hour": None,
                  "max_recipients_per_day": 10_000, "max_connections": 3},
        "limits": N_("30 messages per minute, 10,000 recipients per day and 3 simultaneous "
                     "connections for each mailbox."),
        "source": "https://learn.microsoft.com/office365/servicedescriptions/"
                  "exchange-online-service-description/exchange-online-limits"
                  "#sending-limits",
        "note": N_("Microsoft is retiring password (basic) authentication for SMTP: the "
                   "mailbox must have SMTP AUTH enabled."),
    },
    "google-workspace": {
        "label": N_("Google Workspace (Gmail)"),
        # 2,000 messages, 10,000 recipients and 3,000 external recipients per day and
        # user: at most 2,000 recipients a day keeps every one of the three (a message
        # has at least one recipient, and parents' addresses are mostly external).
        # Google publishes no limit of simultaneous connections for either service.
        "relay": {"host": "smtp.gmail.com", "port": 587, "security": "starttls",
                  "auth": "password", "max_per_minute": None, "max_per_hour": None,
                  "max_recipients_per_day": 2_000, "max_connections": None},
        "limits": N_("2,000 messages per day for each user."),
        "source": "https://support.google.com/a/answer/166852",
        "note": N_("Use an application password; Google refuses the account's own "
                   "password for SMTP."),
    },
    "google-relay": {
        "label": N_("Google Workspace SMTP relay service"),
        "relay": {"host": "smtp-relay.gmail.com", "port": 587, "security": "starttls",
                  "auth": "password", "max_per_minute": None, "max_per_hour": None,
                  "max_recipients_per_day": 10_000, "max_connections": None},
        "limits": N_("10,000 recipients per day for each user."),
        "source": "https://support.google.com/a/answer/2956491",
        "note": N_("The relay service must be enabled in the Google Admin console."),
    },
    "academy": {
        "label": N_("Academy SMTP server"),
        "relay": {"host": "", "port": 587, "security": "starttls", "auth": "password",
                  "max_per_minute": None, "max_per_hour": None,
                  "max_recipients_per_day": None, "max_connections": None},
        "limits": N_("Ask your academy's technical service: limits differ between "
                     "academies."),
        "source": "",
        "note": N_("Generally, you enter your academy's SMTP server: contact your "
                   "academy's technical service or search the Internet, this information "
                   "is often published by the academies."),
    },
}


def presets(lang: str) -> list[dict[str, Any]]:
    return [
        {"id": key, "label": translate(lang, p["label"]), "relay": dict(p["relay"]),
         "limits": translate(lang, p["limits"]), "source": p["source"],
         "note": translate(lang, p["note"])}
        for key, p in PRESETS.items()
    ]
