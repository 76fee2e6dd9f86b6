"""Validate an e-mail submitted as JSON and render it, once, to the RFC 5322 bytes we send.

:class:`MessageIn` is the request schema of every door (HTTP API, SDK, CLI): it refuses
anything that could not become a correct e-mail, with a message a person can act on.
:func:`build_message` applies a :class:`~postier.core.policy.SenderDecision` and produces the
exact bytes that are stored and later streamed to the relay, so what was accepted is what
is sent (see ``ARCHITECTURE.md``).

Two choices worth knowing:

* Header injection is made impossible twice: every text that reaches a header is refused
  at validation if it holds a line break or control character, and the header block is
  written by the small renderer below, which only ever emits validated addresses, RFC 2047
  encoded words and folded ASCII, and re-checks each header line before use (Python 3.11.7
  has no ``verify_generated_headers``).
* Speed: this runs for every accepted message. ``EmailMessage``'s header registry parses
  and refolds every header (~0.8 ms for a plain message), so the top-level headers are
  written here, and so are the usual bodies (one text part, or text plus HTML, in 7bit or
  8bit), in exactly the bytes the ``email`` package would give (property tests compare
  them). Attachments and lines too long for 8bit go through the ``email`` package with
  ``email.policy.SMTP`` (``SMTPUTF8`` when an address needs it). A 2 KiB text message
  builds in ~30 µs.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from email.message import EmailMessage, MIMEPart
from email.policy import EmailPolicy
from email.utils import format_datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from postier.core import policy
from postier.errors import InvalidInput, TooLarge
from postier.i18n import N_

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

MAX_RECIPIENTS = 1000
MAX_HEADERS = 100
# A header name plus ": " must fit in a 78-character line.
MAX_HEADER_NAME = 76
MAX_LINE = 998  # RFC 5322 2.1.1, octets, CRLF excluded
_FOLD_AT = 78  # RFC 5322's "SHOULD" line length for headers

_SMTP = email_policy.SMTP
_SMTPUTF8 = email_policy.SMTPUTF8


class InvalidMessageField(InvalidInput, ValueError):
    """A field of a submitted e-mail is wrong; a ``ValueError`` too, so that pydantic
    reports it with its location (``("headers",)``, ``("attachments", 0, "filename")``)."""

    code = "invalid_message"


# Idempotency keys the server gives its own e-mails: the notices to a sender
# ("notice:failure:<message id>", sender verification codes) and the alerts
# ("alert:<incident>:<phase>"). An e-mail whose key starts with "notice:" gets no notice
# and no webhook event, so a submitted key may not start with one of these (any case).
RESERVED_KEY_PREFIXES = ("notice:", "alert:")


def check_submitted_key(key: str | None, field: str = "idempotency_key") -> None:
    """Refuse (422) a key a user or a program submits when it has a reserved beginning."""
    if key is None:
        return
    start = key[:8].lower()
    for prefix in RESERVED_KEY_PREFIXES:
        if start.startswith(prefix):
            raise InvalidMessageField(_KEY_RESERVED, hint=_KEY_RESERVED_HINT, field=field,
                                      prefix=key[:len(prefix)])


# --------------------------------------------------------------------------- messages

_SUBJECT_BREAK = N_("Line breaks are not allowed in the subject.")
_SUBJECT_CHAR = N_("The subject contains a character that is not allowed ({char}).")
_HEADER_BREAK = N_("Line breaks are not allowed in the value of header {name}.")
_HEADER_CHAR = N_("The value of header {name} contains a character that is not allowed ({char}).")
_HEADER_NOT_X = N_(
    "{name!r} cannot be added: only headers whose name starts with X- may be added, "
    "such as X-Classe."
)
_HEADER_BAD_NAME = N_(
    "{name!r} is not a valid header name: after X-, use letters, digits and hyphens, "
    "such as X-Classe."
)
_HEADER_LONG_NAME = N_("The header name {name!r} is too long (at most {limit} characters).")
_HEADER_TWICE = N_("The header {name} is given twice (header names ignore case).")
_FILENAME_BREAK = N_("Line breaks are not allowed in an attachment name.")
_FILENAME_CHAR = N_("The attachment name contains a character that is not allowed ({char}).")
_FILENAME_PATH = N_(
    "The attachment name {filename!r} must be a file name alone, without a folder (no / or \\)."
)
_FILENAME_EMPTY = N_("The attachment name is empty.")
_CONTENT_TYPE = N_(
    "{content_type!r} is not a valid content type: write type/subtype, such as application/pdf."
)
_CONTENT_TYPE_CONTAINER = N_(
    "An attachment cannot be of type {content_type}: send it as application/octet-stream."
)
_BASE64 = N_(
    "The attachment content is not valid base64: give the file's bytes encoded in base64, "
    "without a data: prefix."
)
_BODY_CHAR = N_("The message body contains a character that is not allowed ({char}).")
_KEY_BREAK = N_("Line breaks are not allowed in the idempotency key.")
_KEY_CHAR = N_("The idempotency key contains a character that is not allowed ({char}).")
_KEY_RESERVED = N_(
    "An idempotency key may not start with {prefix!r}: the server keeps that beginning for "
    "its own e-mails."
)
_KEY_RESERVED_HINT = N_("Choose another key, for example one that starts with your "
                        "program's name.")
_TOO_MANY_RECIPIENTS = N_(
    "There are {count} recipients; at most {limit} are allowed (To, Cc and Bcc together, "
    "each address counted once)."
)

# What str.splitlines() treats as a line break: the email package unfolds and splits
# headers with it, so each of these could end a header line somewhere along the way.
_LINE_BREAK = re.compile(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# Other C0/C1 controls, DEL and lone surrogates (which cannot even be encoded); TAB is fine.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f\ud800-\udfff]")
# In a body, only what cannot be carried: NUL (RFC 2045) and lone surrogates.
_BODY_FORBIDDEN = re.compile(r"[\x00\ud800-\udfff]")
_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_HEADER_NAME = re.compile(r"[Xx]-" + _TCHARS)
_CONTENT_TYPE_RE = re.compile(_TCHARS + "/" + _TCHARS)


def _codepoint(char: str) -> str:
    return f"U+{ord(char):04X}"


def _check_line(value: str, breaks: str, control: str, **params: Any) -> None:
    found = _LINE_BREAK.search(value)
    if found:
        raise InvalidMessageField(breaks, char=_codepoint(found.group()), **params)
    found = _CONTROL.search(value)
    if found:
        raise InvalidMessageField(control, char=_codepoint(found.group()), **params)


def _encodable(text: str) -> bool:
    """Whether ``text`` has no lone surrogate (the only characters UTF-8 cannot encode)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _address(value: str) -> str:
    return policy.normalize_address(value)


EmailAddress = Annotated[
    str,
    AfterValidator(_address),
    Field(description="A bare e-mail address such as jean.dupont@ac-lyon.fr (no name)."),
]


# --------------------------------------------------------------------------- schema


class AttachmentIn(BaseModel):
    """One attached file."""

    model_config = ConfigDict(extra="forbid")

    filename: str = Field(
        min_length=1,
        max_length=255,
        description="File name shown to the recipient, without any folder: emploi-du-temps.pdf",
    )
    content_type: str = Field(
        "application/octet-stream",
        max_length=255,
        description="MIME type as type/subtype, such as application/pdf",
    )
    content: str = Field(
        description="The file's bytes encoded in base64 (line breaks allowed)",
        json_schema_extra={"contentEncoding": "base64"},
    )

    @field_validator("filename")
    @classmethod
    def _filename(cls, value: str) -> str:
        _check_line(value, _FILENAME_BREAK, _FILENAME_CHAR)
        value = value.strip()
        if not value:
            raise InvalidMessageField(_FILENAME_EMPTY)
        # The recipient's mail program may save the file under this name.
        if "/" in value or "\\" in value or value in (".", ".."):
            raise InvalidMessageField(_FILENAME_PATH, filename=value)
        return value

    @field_validator("content_type")
    @classmethod
    def _content_type(cls, value: str) -> str:
        value = value.strip().lower()
        if not _CONTENT_TYPE_RE.fullmatch(value):
            raise InvalidMessageField(_CONTENT_TYPE, content_type=value)
        # multipart/* and message/* parts may not be base64-encoded (RFC 2046), and a
        # reader would try to parse them as e-mail structure.
        if value.startswith(("multipart/", "message/")):
            raise InvalidMessageField(_CONTENT_TYPE_CONTAINER, content_type=value)
        return value

    @field_validator("content")
    @classmethod
    def _content(cls, value: str) -> str:
        try:
            binascii.a2b_base64(value, strict_mode=True)
            return value
        except (binascii.Error, ValueError):
            pass
        # MIME-style base64 wraps lines; accept that, but nothing else out of the alphabet.
        compact = "".join(value.split())
        try:
            binascii.a2b_base64(compact, strict_mode=True)
        except (binascii.Error, ValueError):
            raise InvalidMessageField(_BASE64) from None
        return compact

    @functools.cached_property
    def data(self) -> bytes:
        """The decoded bytes of the file."""
        return base64.b64decode(self.content)


class MessageIn(BaseModel):
    """An e-mail to send, as submitted by a program or a person."""

    model_config = ConfigDict(
        populate_by_name=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "to": ["parent.eleve@gmail.com"],
                    "subject": "Modification de l'emploi du temps",
                    "text": "Bonjour,\nle cours de mathématiques de jeudi est déplacé.",
                }
            ]
        },
    )

    from_: EmailAddress | None = Field(
        None,
        alias="from",
        description="Send as this address instead of your own; it must be yours or one an "
        "administrator granted you. The final From follows the sender policy.",
    )
    to: list[EmailAddress] = Field(
        min_length=1, max_length=MAX_RECIPIENTS, description="Recipients shown in To"
    )
    cc: list[EmailAddress] = Field(
        default_factory=list, max_length=MAX_RECIPIENTS, description="Recipients shown in Cc"
    )
    bcc: list[EmailAddress] = Field(
        default_factory=list,
        max_length=MAX_RECIPIENTS,
        description="Hidden recipients: they receive the e-mail, no header names them",
    )
    reply_to: list[EmailAddress] = Field(
        default_factory=list,
        max_length=MAX_RECIPIENTS,
        description="Where replies go (one address or a list). When the sender policy uses "
        "the establishment's sender and this is empty, your address is used.",
    )
    subject: str = Field("", max_length=998, description="Subject, on one line")
    text: str | None = Field(None, description="Plain-text body")
    html: str | None = Field(None, description="HTML body; with text, both are sent")
    attachments: list[AttachmentIn] = Field(default_factory=list, description="Attached files")
    headers: dict[str, Annotated[str, Field(max_length=998)]] = Field(
        default_factory=dict,
        max_length=MAX_HEADERS,
        description="Extra headers; names must start with X- (X-Classe: 4B)",
    )
    priority: Literal["normal", "bulk"] = Field(
        "normal",
        description="bulk: a mass mailing, sent after normal e-mails waiting at the same time",
    )
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Submitting again with the same key returns the first e-mail, "
        "never a second one",
    )

    @field_validator("reply_to", mode="before")
    @classmethod
    def _one_reply_to(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str) -> str:
        _check_line(value, _SUBJECT_BREAK, _SUBJECT_CHAR)
        # Surrounding spaces would not survive a mail reader's parsing anyway.
        return value.strip(" \t")

    @field_validator("text", "html")
    @classmethod
    def _body(cls, value: str | None) -> str | None:
        # The expression costs ~14 µs over a 2 KiB body; a NUL search and an ASCII test
        # (or, for other text, an encoding, which only lone surrogates fail) settle the
        # usual body in well under 2. The expression then finds the first culprit.
        if value is not None and ("\x00" in value or not _encodable(value)):
            found = _BODY_FORBIDDEN.search(value)
            if found:
                raise InvalidMessageField(_BODY_CHAR, char=_codepoint(found.group()))
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        seen: set[str] = set()
        for name, raw in value.items():
            if len(name) > MAX_HEADER_NAME:
                raise InvalidMessageField(
                    _HEADER_LONG_NAME, name=name[:40] + "…", limit=MAX_HEADER_NAME
                )
            if name[:2].lower() != "x-":
                raise InvalidMessageField(_HEADER_NOT_X, name=name)
            if not _HEADER_NAME.fullmatch(name):
                raise InvalidMessageField(_HEADER_BAD_NAME, name=name)
            if name.lower() in seen:
                raise InvalidMessageField(_HEADER_TWICE, name=name)
            seen.add(name.lower())
            _check_line(raw, _HEADER_BREAK, _HEADER_CHAR, name=name)
            out[name] = raw.strip(" \t")
        return out

    @field_validator("idempotency_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None:
            _check_line(value, _KEY_BREAK, _KEY_CHAR)
        return value

    @model_validator(mode="after")
    def _recipient_count(self) -> MessageIn:
        count = len(self.to) + len(self.cc) + len(self.bcc)
        if count <= MAX_RECIPIENTS:
            return self  # counting each address once can only lower it
        count = len(policy.dedupe_addresses([*self.to, *self.cc, *self.bcc]))
        if count > MAX_RECIPIENTS:
            raise InvalidMessageField(_TOO_MANY_RECIPIENTS, count=count, limit=MAX_RECIPIENTS)
        return self


# --------------------------------------------------------------------------- building


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
    wire = _identity if smtputf8 else policy.ascii_address

    fields = [_address_header("To", [("", wire(a)) for a in msg.to])]
    if msg.cc:
        fields.append(_address_header("Cc", [("", wire(a)) for a in msg.cc]))
    # Bcc recipients are in the envelope only: writing them anywhere in the data would
    # show them to every recipient.
    fields.append(_unstructured("Subject", msg.subject))
    message_id_field = f"Message-ID: {message_id}\r\n"
    extra = [_unstructured(name, value) for name, value in msg.headers.items()]
    for line in (*fields, message_id_field, *extra):
        _assert_safe_header(line)
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
    wire = _identity if smtputf8 else policy.ascii_address
    fields = [_address_header("From", [(decision.from_name, wire(decision.from_address))])]
    if decision.reply_to:
        fields.append(_address_header("Reply-To", [("", wire(a)) for a in decision.reply_to]))
    for line in fields:
        _assert_safe_header(line)
    return "".join(fields)


def _date_header(date: datetime) -> str:
    """The Date field, checked. It shows whole seconds: the e-mails of a batch share one
    (format_datetime costs ~4 µs). Only UTC dates, the usual ones, are cached: aware dates
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
    _assert_safe_header(field)
    return field


def _identity(value: str) -> str:
    return value


def _needs_smtputf8(address: str) -> bool:
    # Domains can always be written as IDNA; only a non-ASCII local part needs SMTPUTF8.
    return not address.rpartition("@")[0].isascii()


# --------------------------------------------------------------------------- body


def _render_body(msg: MessageIn, email_pol: EmailPolicy[EmailMessage]) -> bytes:
    """The MIME entity after the top-level headers: its own Content-* headers and body."""
    if not msg.attachments:
        # Most e-mails are one text part, or text and HTML: written directly (the same
        # bytes as the email package's, see below) they cost ~25 µs instead of 0.2-0.8 ms.
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
        # LF only, the usual text: the same bytes without a list of lines (~5 µs less for
        # 2 KiB).
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

# RFC 5322 atext: what a display-name word may hold without quoting.
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
# Characters that stand for themselves in a Q encoded word, in every context (RFC 2047 5(3)).
_Q_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
# An encoded word plus the space before it stays within the 78-character line.
_EW_MAX = 68
_EW_OVERHEAD = len("=?utf-8?q??=")
_WORDS = re.compile(r"[ \t]*[^ \t]+")


def _address_header(name: str, mailboxes: Sequence[tuple[str, str]]) -> str:
    if len(mailboxes) == 1 and not mailboxes[0][0]:
        # One bare address (a mass mailing's To): what _fold gives for its single token.
        return f"{name}: {mailboxes[0][1]}\r\n"
    tokens: list[str] = []
    for index, (display, address) in enumerate(mailboxes):
        words = [*_phrase(display), f"<{address}>"] if display else [address]
        if index < len(mailboxes) - 1:
            words[-1] += ","
        tokens.extend(" " + word for word in words)
    return _fold(name, tokens)


def _unstructured(name: str, value: str) -> str:
    if not value:
        return f"{name}:\r\n"
    words = _WORDS.findall(value) if value.isascii() and "=?" not in value else None
    if words is None or any(len(word) > MAX_LINE - MAX_HEADER_NAME - 2 for word in words):
        # Non-ASCII text, text a reader could mistake for an encoded word, or a word too
        # long to fold: encoded words carry it exactly (the spaces between them are
        # ignored by readers, the text's own spaces are inside them).
        tokens = [" " + word for word in _encoded_words(value)]
    else:
        # Plain ASCII: fold before existing spaces only, so unfolding gives the value back
        # exactly. Each word carries the spaces that precede it.
        tokens = [" " + words[0], *words[1:]]
    return _fold(name, tokens)


def _phrase(name: str) -> list[str]:
    """A display name as words to be separated by single spaces."""
    if name.isascii() and "=?" not in name:
        words = name.split(" ")
        if all(_ATEXT.fullmatch(word) for word in words):
            return words
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if len(quoted) <= MAX_LINE - 100:
            return [quoted]
        return _encoded_words(name)
    words = name.split(" ")
    if "" in words:
        # Irregular spacing would be lost between plain words: encode all of it.
        return _encoded_words(name)
    out: list[str] = []
    run: list[str] = []
    # Plain words stay readable; runs of words that need encoding share encoded words so
    # that the spaces between them are kept inside (RFC 2047 readers drop the spaces
    # between two encoded words).
    for word in words:
        if _ATEXT.fullmatch(word) and "=?" not in word:
            if run:
                out.extend(_encoded_words(" ".join(run)))
                run = []
            out.append(word)
        else:
            run.append(word)
    if run:
        out.extend(_encoded_words(" ".join(run)))
    return out


def _encoded_words(text: str) -> list[str]:
    """RFC 2047 encoded words for ``text``, each at most 68 characters, split only between
    characters. Q encoding when it is not longer than base64 (mostly Latin text), base64
    otherwise."""
    raw = text.encode("utf-8")
    q_text = text.translate(_Q_TABLE)
    if len(q_text) <= (len(raw) + 2) // 3 * 4:
        if len(q_text) <= _EW_MAX - _EW_OVERHEAD:
            # One encoded word holds it all (a usual subject): what _chunk_q would give.
            return [f"=?utf-8?q?{q_text}?="] if q_text else []
        return _chunk_q([_Q_TABLE[ord(c)] for c in text])
    return _chunk_b64(raw)


class _QTable(dict[int, str]):
    """Code point -> its Q encoding, for str.translate; filled as characters are met, up
    to a bound (beyond it, computed each time: a hostile text cannot grow it forever)."""

    def __missing__(self, code: int) -> str:
        encoded = _q_char(chr(code))
        if len(self) < 4096:
            self[code] = encoded
        return encoded


_Q_TABLE = _QTable()


@functools.lru_cache(maxsize=4096)
def _q_char(char: str) -> str:
    if char in _Q_SAFE:
        return char
    if char == " ":
        return "_"
    return "".join(f"={byte:02X}" for byte in char.encode("utf-8"))


def _chunk_q(parts: list[str]) -> list[str]:
    room = _EW_MAX - _EW_OVERHEAD
    words: list[str] = []
    current = ""
    for part in parts:
        if len(current) + len(part) > room:
            words.append(f"=?utf-8?q?{current}?=")
            current = ""
        current += part
    if current:
        words.append(f"=?utf-8?q?{current}?=")
    return words


def _chunk_b64(raw: bytes) -> list[str]:
    room = (_EW_MAX - _EW_OVERHEAD) // 4 * 3
    words: list[str] = []
    start = 0
    while start < len(raw):
        end = min(start + room, len(raw))
        # Never cut a UTF-8 sequence: each encoded word must decode on its own.
        while end < len(raw) and raw[end] & 0xC0 == 0x80:
            end -= 1
        words.append("=?utf-8?b?" + base64.b64encode(raw[start:end]).decode("ascii") + "?=")
        start = end
    return words


def _fold(name: str, tokens: Sequence[str]) -> str:
    """Join ``tokens`` (each starting with the whitespace that precedes it) after
    ``name:``, breaking the line before a token when the line would exceed 78 characters."""
    lines: list[str] = []
    line = name + ":" + tokens[0] if tokens else name + ":"
    for token in tokens[1:]:
        # The first token stays on the name line: a reader strips the spaces after the
        # colon, not those of a continuation line.
        if len(line) + len(token) > _FOLD_AT:
            lines.append(line)
            line = token
        else:
            line += token
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


# What no header line may hold: the characters of _LINE_BREAK and _CONTROL together.
_UNSAFE = r"\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"
# One header field: a name line with a colon that does not start with a space, then
# continuation lines that start with one and hold something else than spaces (\s and
# str.strip() agree on what a space is), each ended by CRLF. Possessive, so that a bad
# line is refused in linear time.
_SAFE_HEADER = re.compile(
    rf"(?=[^{_UNSAFE}]*:)[^ \t{_UNSAFE}][^{_UNSAFE}]*+\r\n"
    rf"(?:[ \t][^\S{_UNSAFE}]*+[^\s{_UNSAFE}][^{_UNSAFE}]*+\r\n)*+"
)


def _assert_safe_header(header: str) -> None:
    """Refuse to emit anything but one header: a name line and continuation lines that
    start with a space and hold some text, within 998 octets each."""
    # One expression for the shape, then the length: a header of at most 998 octets in
    # all (the usual one) cannot have a longer line. tests/unit/test_message_fast_paths.py
    # holds this to the line-by-line reading.
    if _SAFE_HEADER.fullmatch(header) and (
        len(header.encode("utf-8")) <= MAX_LINE + 2
        or all(len(line.encode("utf-8")) <= MAX_LINE for line in header[:-2].split("\r\n"))
    ):
        return
    raise ValueError(f"refusing to write an unsafe header: {header!r}")


# -- messages submitted over SMTP --------------------------------------------------------------

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
# read without the email package's RFC 5322 parser (about 15 µs a header); anything else
# goes to it (tests/unit/test_message_fast_paths.py holds both to the same answers).
_SIMPLE_MAILBOX = re.compile(
    rf"(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~ -]*<({_DOT_ATOM_ADDRESS})>|({_DOT_ATOM_ADDRESS}))")
_READ_FIELDS = frozenset({"from", "reply-to", "subject", "message-id"})


def header_addresses(values: list[str]) -> list[str]:
    """The addresses of From/Reply-To header values, as ``email.utils.getaddresses``
    reads them (empty ones dropped)."""
    from email.utils import getaddresses

    if len(values) == 1 and (m := _SIMPLE_MAILBOX.fullmatch(values[0].strip(" \t"))):
        return [m.group(1) or m.group(2)]
    return [a for _, a in getaddresses(values) if a]


def read_submitted(raw: bytes) -> SubmittedHeaders:
    """Read the sender-related headers of a submitted message (RFC 5322 bytes, CRLF)."""
    from email.header import decode_header, make_header

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
    wire = _identity if smtputf8 else policy.ascii_address
    head = [_address_header("From", [(decision.from_name, wire(decision.from_address))])]
    if decision.reply_to:
        head.append(_address_header("Reply-To", [("", wire(a)) for a in decision.reply_to]))
    names = {name for name, _ in fields}
    if "message-id" not in names:
        head.append(f"Message-ID: {message_id}\r\n")
    if "date" not in names:
        head.append(f"Date: {format_datetime(datetime.now(UTC))}\r\n")
    for line in head:
        _assert_safe_header(line)
    kept = b"".join(field for name, field in fields if name not in _POLICY_HEADERS)
    data = "".join(head).encode("utf-8") + kept + b"\r\n" + body
    if len(data) > max_size:
        raise TooLarge(size=len(data), limit=max_size)
    return data
