"""An e-mail submitted over SMTP, already in RFC 5322: read the few fields the sender
policy needs, then rewrite its sender and keep everything else byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.utils import format_datetime, getaddresses

from postier.core import policy
from postier.core.header_fields import address_header, assert_safe_header, unchanged
from postier.core.message_input import InvalidMessageField
from postier.errors import TooLarge
from postier.i18n import N_

# Headers the sender policy owns in a submitted message; Bcc and Return-Path never travel.
_POLICY_HEADERS = frozenset({"from", "sender", "reply-to", "bcc", "return-path"})


@dataclass(frozen=True)
class SubmittedHeaders:
    """What the sender policy needs from a message an SMTP client submitted."""

    from_addresses: tuple[str, ...]
    reply_to: tuple[str, ...]
    subject: str
    message_id: str | None
    has_date: bool


def _split_submitted(raw: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """Header fields as (lower-case name, raw bytes with their CRLFs) and the body."""
    end = raw.find(b"\r\n\r\n")
    head, body = (raw[: end + 2], raw[end + 4 :]) if end >= 0 else (raw, b"")
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n")[:-1] if head.endswith(b"\r\n") else head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line + b"\r\n")
        elif b":" in line:
            fields.append((line.split(b":", 1)[0].strip().lower().decode("ascii", "replace"),
                           line + b"\r\n"))
        else:
            raise InvalidMessageField(
                N_("The message's header section has a line that is not a header: {line}."),
                field="data", line=line[:80].decode("utf-8", "replace"),
            )
    return fields, body


def _field_value(field: bytes) -> str:
    text = field.decode("utf-8", "surrogateescape")
    return re.sub(r"\r\n[ \t]", " ", text.split(":", 1)[1]).strip()


_ATOM_CHAR = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM_ADDRESS = rf"{_ATOM_CHAR}+(?:\.{_ATOM_CHAR}+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
# "address" or "Plain Name <address>": what most programs write in From and Reply-To,
# read without the email package's RFC 5322 parser (slow for the usual header); anything else
# goes to it (tests/unit/test_message_fast_paths.py holds both to the same answers).
_SIMPLE_MAILBOX = re.compile(
    rf"(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~ -]*<({_DOT_ATOM_ADDRESS})>|({_DOT_ATOM_ADDRESS}))")
_READ_FIELDS = frozenset({"from", "reply-to", "subject", "message-id"})


def header_addresses(values: list[str]) -> list[str]:
    """The addresses of From/Reply-To header values, as ``email.utils.getaddresses``
    reads them (empty ones dropped)."""
    if len(values) == 1 and (m := _SIMPLE_MAILBOX.fullmatch(values[0].strip(" \t"))):
        return [m.group(1) or m.group(2)]
    return [a for _, a in getaddresses(values) if a]


def read_submitted(raw: bytes) -> SubmittedHeaders:
    """Read the sender-related headers of a submitted message (RFC 5322 bytes, CRLF)."""
    fields, _ = _split_submitted(raw)
    values: dict[str, list[str]] = {}
    for name, field in fields:
        values.setdefault(name, []).append(
            _field_value(field) if name in _READ_FIELDS else "")
    froms = header_addresses(values.get("from", []))
    replies = header_addresses(values.get("reply-to", []))
    subject = values.get("subject", [""])[0]
    if "=?" in subject:  # encoded words (RFC 2047); a plain subject reads as it is
        try:
            subject = str(make_header(decode_header(subject)))
        except (ValueError, LookupError, UnicodeError):
            pass
    return SubmittedHeaders(
        from_addresses=tuple(froms),
        reply_to=tuple(replies),
        subject=subject[:998],
        message_id=(values.get("message-id") or [""])[0] or None,
        has_date="date" in values,
    )


def rewrite_submitted(
    raw: bytes,
    decision: policy.SenderDecision,
    *,
    message_id: str,
    max_size: int = 25 * 1024 * 1024,
    smtputf8: bool = False,
) -> bytes:
    """The submitted message with the sender policy applied: From (and Reply-To when the
    policy sets one) written by Postier, Sender/Bcc/Return-Path removed, Message-ID and Date
    added when missing. Every other header and the body are kept byte for byte."""
    fields, body = _split_submitted(raw)
    wire = unchanged if smtputf8 else policy.ascii_address
    head = [address_header("From", [(decision.from_name, wire(decision.from_address))])]
    if decision.reply_to:
        head.append(address_header("Reply-To", [("", wire(a)) for a in decision.reply_to]))
    names = {name for name, _ in fields}
    if "message-id" not in names:
        head.append(f"Message-ID: {message_id}\r\n")
    if "date" not in names:
        head.append(f"Date: {format_datetime(datetime.now(UTC))}\r\n")
    for line in head:
        assert_safe_header(line)
    kept = b"".join(field for name, field in fields if name not in _POLICY_HEADERS)
    data = "".join(head).encode("utf-8") + kept + b"\r\n" + body
    if len(data) > max_size:
        raise TooLarge(size=len(data), limit=max_size)
    return data
