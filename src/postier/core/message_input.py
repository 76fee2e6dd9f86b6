"""An e-mail submitted as JSON, validated: the request schema of every door.

:class:`MessageIn` (HTTP API, SDK, CLI) refuses anything that could not become a correct
e-mail, with a message a person can act on. Every text that will reach a header is
refused here if it holds a line break or a control character: the first of the two walls
against header injection (the second is :func:`postier.core.header_fields.assert_safe_header`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
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
from postier.errors import InvalidInput
from postier.i18n import N_

MAX_RECIPIENTS = 1000
MAX_HEADERS = 100
# A header name plus ": " must fit in a 78-character line.
MAX_HEADER_NAME = 76
MAX_LINE = 998  # RFC 5322 2.1.1, octets, CRLF excluded

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
        # A NUL search and an ASCII test (or, for other text, an encoding, which only lone
        # surrogates fail) settle the usual body far faster than the expression, which then
        # finds the first culprit.
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
