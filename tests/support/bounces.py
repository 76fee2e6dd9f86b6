"""Bounces as a recipient's mail server writes them: an RFC 3464 delivery status
notification (DSN) for a return address, and the SMTP conversation of the bounce door."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from email.utils import make_msgid


def dsn(return_address: str, recipient: str, *, status: str = "5.1.1", code: int = 550,
        diagnostic: str = "User unknown", action: str = "failed",
        original_message_id: str | None = None) -> bytes:
    """A Postfix-style DSN to ``return_address`` about ``recipient``."""
    boundary = "=_dsn_boundary_1"
    text = f"""From: MAILER-DAEMON@mx.example.org (Mail Delivery System)
To: {return_address}
Subject: Undelivered Mail Returned to Sender
Message-ID: {make_msgid(domain="mx.example.org")}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"

--{boundary}
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.example.org.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<{recipient}>: host mx.example.org said: {code} {status} {diagnostic}

--{boundary}
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: {action}
Status: {status}
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; {code} {status} <{recipient}>: {diagnostic}

--{boundary}
Content-Type: text/rfc822-headers

From: someone@ac-lyon.fr
To: {recipient}
Subject: Sortie
Message-ID: {original_message_id or "<x@ac-lyon.fr>"}

--{boundary}--
"""
    return text.replace("\n", "\r\n").encode()


def out_of_office(return_address: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "parent@example.org"
    msg["To"] = return_address
    msg["Subject"] = "Réponse automatique : Sortie"
    msg["Auto-Submitted"] = "auto-replied"
    msg.set_content("Je suis absent jusqu'au 3 janvier.")
    return msg.as_bytes()


def bounce_by_smtp(port: int, rcpt: str, data: bytes) -> tuple[int, bytes]:
    """Send ``data`` to the bounce door from the null sender; the DATA reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("mx.example.org")
        s.mail("<>")
        code, reply = s.rcpt(rcpt)
        if code != 250:
            return code, reply
        return s.data(data)
