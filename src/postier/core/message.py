"""Render a validated e-mail, once, to the RFC 5322 bytes that are stored and sent.

:func:`build_message` applies a :class:`~postier.core.policy.SenderDecision` to a
:class:`~postier.core.message_input.MessageIn` (validated at the door, re-exported here)
and produces the exact bytes that are stored and later streamed to the relay, so what was
accepted is what is sent (see ``docs/architecture.md``).

Speed: this runs for every accepted message. The top-level headers are written by
:mod:`postier.core.header_fields`, and so are the usual bodies here (one text part, or
text plus HTML, in 7bit or 8bit), in exactly the bytes the ``email`` package would give
(property tests compare them). Attachments and lines too long for 8bit go through the
``email`` package with ``email.policy.SMTP`` (``SMTPUTF8`` when an address needs it).
"""

from __future__ import annotations

import functools
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from email.message import EmailMessage, MIMEPart
from email.policy import EmailPolicy
from email.utils import format_datetime

from postier.core import policy
from postier.core.header_fields import (
    address_header,
    assert_safe_header,
    unchanged,
    unstructured_header,
)
from postier.core.message_input import (
    MAX_LINE,
    MAX_RECIPIENTS,
    RESERVED_KEY_PREFIXES,
    AttachmentIn,
    InvalidMessageField,
    MessageIn,
    check_submitted_key,
)
from postier.errors import TooLarge

__all__ = [
    "MAX_RECIPIENTS",
    "RESERVED_KEY_PREFIXES",
    "AttachmentIn",
    "BuiltMessage",
    "InvalidMessageField",
    "MessageIn",
    "build_message",
    "check_submitted_key",
    "make_message_id",
]

_SMTP = email_policy.SMTP
_SMTPUTF8 = email_policy.SMTPUTF8




@dataclass(frozen=True)
class BuiltMessage:
    """An e-mail rendered to the bytes that will be sent, with its envelope.

    Addresses in ``envelope_from`` and ``recipients`` have IDNA (ASCII) domains, unless
    ``smtputf8`` is true: then some address has a non-ASCII local part and the relay must
    be asked for SMTPUTF8.
    """

    data: bytes
    envelope_from: str
    recipients: tuple[str, ...]
    message_id: str
    subject: str
    size: int
    smtputf8: bool


_MESSAGE_ID = re.compile(r"<[!-;=?-~]+@[!-;=?-~]+>")  # printable ASCII, no < > or space


def make_message_id(domain: str) -> str:
    """A new, globally unique Message-ID such as ``<3f…9a@ac-lyon.fr>``.

    ``domain`` (usually the sender's) is written in its IDNA form; 128 random bits make
    collisions impossible in practice without any per-host state.
    """
    return f"<{secrets.token_hex(16)}@{_message_id_domain(domain)}>"


@functools.lru_cache(maxsize=256)
def _message_id_domain(domain: str) -> str:
    """``domain`` as a Message-ID's right part, checked once per domain: whether the
    Message-ID is valid depends on it alone (the left part is always hexadecimal)."""
    try:
        ascii_domain = policy.ascii_domain(domain.strip())
    except ValueError:
        raise ValueError(f"not a domain name: {domain!r}") from None
    if not _MESSAGE_ID.fullmatch(f"<0@{ascii_domain}>"):
        raise ValueError(f"not a domain name: {domain!r}")
    return ascii_domain


def build_message(
    msg: MessageIn,
    decision: policy.SenderDecision,
    *,
    message_id: str,
    max_size: int = 25 * 1024 * 1024,
    date: datetime | None = None,
) -> BuiltMessage:
    """Render ``msg`` with the sender chosen by ``decision`` to RFC 5322 bytes (CRLF).

    ``message_id`` (from :func:`make_message_id`) is kept as given, so that it stays the
    same across retries. A naive ``date`` is taken as UTC. Raises :class:`TooLarge` when
    the result exceeds ``max_size`` bytes.
    """
    if not _MESSAGE_ID.fullmatch(message_id):
        raise ValueError(f"not a Message-ID: {message_id!r}")
    if date is None:
        date_field = _current_date_header()
    else:
        date_field = _date_header(date if date.tzinfo else date.replace(tzinfo=UTC))

    everyone = policy.dedupe_addresses([*msg.to, *msg.cc, *msg.bcc])
    smtputf8 = _sender_needs_smtputf8(decision) or any(_needs_smtputf8(a) for a in everyone)
    # Without SMTPUTF8 every domain must travel as IDNA; with it, Unicode is allowed and
    # reads better in the recipient's headers.
    wire = unchanged if smtputf8 else policy.ascii_address

    fields = [address_header("To", [("", wire(a)) for a in msg.to])]
    if msg.cc:
        fields.append(address_header("Cc", [("", wire(a)) for a in msg.cc]))
    # Bcc recipients are in the envelope only: writing them anywhere in the data would
    # show them to every recipient.
    fields.append(unstructured_header("Subject", msg.subject))
    message_id_field = f"Message-ID: {message_id}\r\n"
    extra = [unstructured_header(name, value) for name, value in msg.headers.items()]
    for line in (*fields, message_id_field, *extra):
        assert_safe_header(line)
    # From and Reply-To (the same for a whole batch) and Date were checked when cached.
    head = "".join((
        _sender_fields(decision, smtputf8), *fields, date_field, message_id_field,
        "MIME-Version: 1.0\r\n", *extra,
    ))

    body = _render_body(msg, _SMTPUTF8 if smtputf8 else _SMTP)
    data = head.encode("utf-8" if smtputf8 else "ascii") + body
    if len(data) > max_size:
        raise TooLarge(size=len(data), limit=max_size)
    return BuiltMessage(
        data=data,
        envelope_from=wire(decision.envelope_from),
        recipients=tuple(wire(a) for a in everyone),
        message_id=message_id,
        subject=msg.subject,
        size=len(data),
        smtputf8=smtputf8,
    )


# The sender's part of the header block is the same for every message of a batch (one
# decision, rendered once). SenderDecision is frozen, hence hashable by its values.


@functools.lru_cache(maxsize=256)
def _sender_needs_smtputf8(decision: policy.SenderDecision) -> bool:
    return any(
        _needs_smtputf8(a)
        for a in (decision.envelope_from, decision.from_address, *decision.reply_to)
    )


@functools.lru_cache(maxsize=256)
def _sender_fields(decision: policy.SenderDecision, smtputf8: bool) -> str:
    """From, and Reply-To when the decision sets one, checked."""
    wire = unchanged if smtputf8 else policy.ascii_address
    fields = [address_header("From", [(decision.from_name, wire(decision.from_address))])]
    if decision.reply_to:
        fields.append(address_header("Reply-To", [("", wire(a)) for a in decision.reply_to]))
    for line in fields:
        assert_safe_header(line)
    return "".join(fields)


def _date_header(date: datetime) -> str:
    """The Date field, checked. It shows whole seconds: the e-mails of a batch share one
    (format_datetime is not free). Only UTC dates, the usual ones, are cached: aware dates
    of other zones equal to them would print another offset."""
    if date.tzinfo is UTC:
        return _utc_date_header(date.replace(microsecond=0))
    return _date_field(date)


_now_field: tuple[int, str] = (-1, "")


def _current_date_header() -> str:
    """The Date field of this second, made once a second (the clock read as an integer:
    cheaper than building a datetime for each e-mail of a batch)."""
    global _now_field
    second = int(time.time())
    if _now_field[0] != second:
        _now_field = (second, _date_field(datetime.fromtimestamp(second, UTC)))
    return _now_field[1]


@functools.lru_cache(maxsize=16)
def _utc_date_header(date: datetime) -> str:
    return _date_field(date)


def _date_field(date: datetime) -> str:
    field = f"Date: {format_datetime(date)}\r\n"
    assert_safe_header(field)
    return field


def _needs_smtputf8(address: str) -> bool:
    # Domains can always be written as IDNA; only a non-ASCII local part needs SMTPUTF8.
    return not address.rpartition("@")[0].isascii()


# --------------------------------------------------------------------------- body


def _render_body(msg: MessageIn, email_pol: EmailPolicy[EmailMessage]) -> bytes:
    """The MIME entity after the top-level headers: its own Content-* headers and body."""
    if not msg.attachments:
        # Most e-mails are one text part, or text and HTML: written directly (the same
        # bytes as the email package's, see below) they cost a small part of its time.
        if msg.html is None:
            fast = _single_text_part(msg.text or "", "plain")
        elif msg.text is None:
            fast = _single_text_part(msg.html, "html")
        else:
            fast = _alternative(msg.text, msg.html)
        if fast is not None:
            return fast
    return _mime_body(msg, email_pol)


def _mime_body(msg: MessageIn, email_pol: EmailPolicy[EmailMessage]) -> bytes:
    root = MIMEPart(policy=email_pol)
    if msg.text is None and msg.html is not None:
        root.set_content(msg.html, subtype="html", cte=_text_cte(msg.html))
    else:
        text = msg.text or ""
        root.set_content(text, subtype="plain", cte=_text_cte(text))
        if msg.html is not None:
            root.add_alternative(msg.html, subtype="html", cte=_text_cte(msg.html))
    for attachment in msg.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        root.add_attachment(attachment.data, maintype, subtype, filename=attachment.filename)
    return root.as_bytes()


def _single_text_part(text: str, subtype: str) -> bytes | None:
    """What ``_mime_body`` gives for a lone text part, byte for byte (a property test holds
    it to that), when 7bit or 8bit can carry it; ``None`` otherwise (lines over 998 octets
    need quoted-printable or base64: left to the email package)."""
    raw = text.encode("utf-8")
    if b"\r" in raw:
        lines = raw.splitlines()
        if lines and max(map(len, lines)) > MAX_LINE:
            return None
        data = b"\r\n".join(lines) + b"\r\n"
    else:
        # LF only, the usual text: the same bytes without building a list of lines.
        if _has_long_line(raw):
            return None
        data = raw.replace(b"\n", b"\r\n")
        if not raw.endswith(b"\n"):
            data += b"\r\n"
    cte = "7bit" if text.isascii() else "8bit"
    head = (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    )
    return head.encode("ascii") + data


def _has_long_line(raw: bytes) -> bool:
    """Whether a line of ``raw`` (split at LF only) is longer than 998 octets, looking at
    a few windows instead of splitting it into lines."""
    start = 0  # always the start of a line
    while len(raw) - start > MAX_LINE:
        # The last LF among the next 999 octets: every line starting before it ends
        # before it, within the limit; none at all means a line of 999 octets or more.
        end = raw.rfind(b"\n", start, start + MAX_LINE + 1)
        if end < 0:
            return True
        start = end + 1
    return False


def _alternative(text: str, html: str, boundary: str | None = None) -> bytes | None:
    """multipart/alternative of the two, laid out as the email package's generator does
    (``boundary`` is for tests; a random one is drawn otherwise)."""
    plain = _single_text_part(text, "plain")
    rich = _single_text_part(html, "html")
    if plain is None or rich is None:
        return None
    if boundary is None:
        boundary = _boundary(plain, rich)
    return b"".join(
        (
            f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\n".encode("ascii"),
            plain,
            f"\r\n--{boundary}\r\n".encode("ascii"),
            rich,
            f"\r\n--{boundary}--\r\n".encode("ascii"),
        )
    )


def _boundary(*parts: bytes) -> str:
    # 128 random bits never occur in a body by chance; checking costs a substring search
    # and makes a crafted body harmless too.
    while True:
        boundary = "=_" + secrets.token_hex(16)
        token = boundary.encode("ascii")
        if not any(token in part for part in parts):
            return boundary


def _text_cte(text: str) -> str | None:
    """7bit or 8bit when every line fits RFC 5322's 998 octets, else ``None``: the email
    package's choice (quoted-printable or base64).

    The package alone would quoted-print any line over 78 characters, and paragraphs typed
    in a form are one long line each: that costs time and makes the source unreadable,
    while 998 octets is the real limit.
    """
    # Lines as the package's encoder splits them (bytes.splitlines(): CR, LF, CRLF only).
    lines = text.encode("utf-8").splitlines()
    if lines and max(map(len, lines)) > MAX_LINE:
        return None
    return "7bit" if text.isascii() else "8bit"


# --------------------------------------------------------------------------- headers
