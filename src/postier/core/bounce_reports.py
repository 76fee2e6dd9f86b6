"""Reading bounces: what a report that comes back to a return address says, as data.

It is a delivery report (RFC 3464, or one of the non-standard texts servers still send),
a complaint (ARF, RFC 5965), an auto-reply (RFC 3834) or something else;
:func:`parse_bounce` tells which, which recipients failed or are late with the remote
server's code and words, and the Message-ID of the returned original. The non-standard
forms are recognised by patterns kept as data in ``bounce_patterns.json`` (its ``about``
says how): a new form is a new entry there, the code applies every form the same way.

Reports come from anyone: :func:`parse_bounce` never raises, reads at most
:data:`MAX_PARTS` parts and :data:`MAX_DEPTH` levels of nesting, applies its patterns to
a bounded prefix of each text, and keeps its work linear in the input.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from email.errors import MessageError
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from email.utils import getaddresses
from importlib.resources import files
from typing import Any

MAX_DEPTH = 20
MAX_PARTS = 500
MAX_RECIPIENTS = 200
TEXT_CHARS = 64 * 1024  # of each text part, what the patterns read
REPORT_CHARS = 256 * 1024  # of all text parts together
HEADER_CHARS = 4096
DIAGNOSTIC_CHARS = 500
LINE_CHARS = 1000  # longer lines are cut, so that no pattern works on one for long
BLOCK_CHARS = 8192  # the text after a recipient that its diagnostic is looked for in

ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
DELIVERY_STATUS = frozenset({"message/delivery-status", "message/global-delivery-status"})
FEEDBACK_REPORT = "message/feedback-report"
RETURNED = frozenset({"message/rfc822", "message/global", "text/rfc822-headers",
                      "message/rfc822-headers", "message/global-headers"})
ADDRESSED_TO = ("To", "Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To")


@dataclass(frozen=True)
class BouncedRecipient:
    """One recipient of a report: ``action`` and ``status`` as in RFC 3464 (``status`` is
    "" when the report gives none), ``code`` the SMTP reply code, ``diagnostic`` the
    remote server's words on one line."""

    address: str
    action: str
    status: str
    code: int | None
    diagnostic: str

    @property
    def permanent(self) -> bool:
        return self.action == "failed" or self.status.startswith("5")


@dataclass(frozen=True)
class BounceReport:
    """What a report is (``kind``), which reader understood it (``form``), the
    recipients it speaks of, the returned original's Message-ID, and the addresses the
    report was sent to (where a per-message return address is found)."""

    kind: str
    form: str
    recipients: tuple[BouncedRecipient, ...]
    original_message_id: str | None
    addressed_to: tuple[str, ...]


# -- the patterns ------------------------------------------------------------------------

@dataclass(frozen=True)
class Form:
    """One non-standard report form, from ``bounce_patterns.json``."""

    name: str
    recognise: tuple[tuple[tuple[str, re.Pattern[str]], ...], ...]  # any of: all (field, pattern)
    recipients: tuple[re.Pattern[str], ...]
    recipient_headers: tuple[str, ...]
    diagnostic: tuple[re.Pattern[str], ...]
    diagnostic_strip: tuple[re.Pattern[str], ...]
    delayed: tuple[re.Pattern[str], ...]
    needs_recipients: bool


@dataclass(frozen=True)
class Patterns:
    """Everything ``bounce_patterns.json`` holds, compiled."""

    forms: tuple[Form, ...]
    returned_copy: tuple[re.Pattern[str], ...]
    quoted_message_id: tuple[re.Pattern[str], ...]
    delayed: tuple[re.Pattern[str], ...]
    given_up: tuple[re.Pattern[str], ...]
    autoreply_headers: tuple[tuple[str, re.Pattern[str]], ...]
    autoreply_subject: tuple[re.Pattern[str], ...]


def load_patterns(document: Mapping[str, Any]) -> Patterns:
    """The patterns of a document shaped like ``bounce_patterns.json``, compiled."""
    shorthands: dict[str, str] = dict(document.get("shorthands", {}))

    def one(source: str) -> re.Pattern[str]:
        for name, expansion in shorthands.items():
            source = source.replace(name, expansion)
        return re.compile(source)

    def compiled(sources: Iterable[str]) -> tuple[re.Pattern[str], ...]:
        return tuple(map(one, sources))

    def form(entry: Mapping[str, Any]) -> Form:
        recognise = tuple(tuple((key.lower(), one(source)) for key, source in alternative.items())
                          for alternative in entry.get("recognise", []))
        return Form(entry["form"], recognise, compiled(entry.get("recipients", [])),
                    tuple(entry.get("recipient_headers", [])),
                    compiled(entry.get("diagnostic", [])),
                    compiled(entry.get("diagnostic_strip", [])),
                    compiled(entry.get("delayed", [])), bool(entry.get("needs_recipients")))

    autoreply = document.get("autoreply", {})
    return Patterns(
        forms=tuple(form(entry) for entry in document.get("forms", [])),
        returned_copy=compiled(document.get("returned_copy", [])),
        quoted_message_id=compiled(document.get("quoted_message_id", [])),
        delayed=compiled(document.get("delayed", [])),
        given_up=compiled(document.get("given_up", [])),
        autoreply_headers=tuple((n, one(s)) for n, s in autoreply.get("headers", {}).items()),
        autoreply_subject=compiled(autoreply.get("subject", [])),
    )


PATTERNS_FILE = files(__package__ or "postier.core").joinpath("bounce_patterns.json")
PATTERNS = load_patterns(json.loads(PATTERNS_FILE.read_text(encoding="utf-8")))


# -- entry point ---------------------------------------------------------------------------

def parse_bounce(data: bytes) -> BounceReport:
    """What the report ``data`` (a whole message, as received) says; never raises."""
    addressed_to: tuple[str, ...] = ()
    try:
        message = _parse(bytes(data))
        addressed_to = _addressed_to(message)
        return _read(message, addressed_to, PATTERNS)
    # Anything the input provokes (a defect the email package raises on, a codec's
    # error, RecursionError, MemoryError) must leave the caller with an answer.
    except Exception:
        return BounceReport("unknown", "unknown", (), None, addressed_to)


def _parse(data: bytes) -> Message:
    data = _tame_content_types(data)
    try:
        return BytesParser(policy=compat32).parsebytes(data)
    except RecursionError:
        # The stdlib parser recurses once per nesting level: too deep a nesting leaves
        # only the report's own headers to read, which still say where it was sent.
        return BytesParser(policy=compat32).parsebytes(data, headersonly=True)


_CONTENT_TYPE_FIELD = re.compile(rb"(?im)^content-type[ \t]*:")
_FIELD_END = re.compile(rb"\n(?![ \t])")


def _tame_content_types(data: bytes) -> bytes:
    """``data`` with every Content-Type field cut to :data:`HEADER_CHARS` bytes: the
    stdlib parses a field's parameters in time quadratic in its length while parsing."""
    pieces: list[bytes] = []
    done = 0
    for match in _CONTENT_TYPE_FIELD.finditer(data):
        end_match = _FIELD_END.search(data, match.end())
        end = end_match.start() if end_match else len(data)
        if end - match.start() > HEADER_CHARS:
            pieces += [data[done:match.start() + HEADER_CHARS], b"\n"]
            done = end + 1
    return b"".join([*pieces, data[done:]]) if pieces else data


def _read(message: Message, addressed_to: tuple[str, ...], patterns: Patterns) -> BounceReport:
    parts = _Parts.of(message)
    text = _report_text(parts)
    cut = _first_match(patterns.returned_copy, text)
    body = text[:cut.start()] if cut else text
    original = _original_message_id(parts, text[cut.start():] if cut else text, patterns)

    def report(kind: str, form: str, recipients: Iterable[BouncedRecipient] = ()) -> BounceReport:
        return BounceReport(kind, form, tuple(recipients)[:MAX_RECIPIENTS], original,
                            addressed_to)

    if parts.delivery_status:
        found = _dsn_recipients(parts.delivery_status)
        if found:
            return report("dsn", "rfc3464", found)
    if parts.feedback:
        return report("complaint", "arf", _complaint_recipients(parts))
    reading = _Reading(message, _header(message, "Subject"), _header(message, "From"), body)
    recognised = [form for form in patterns.forms if reading.recognises(form)]
    for form in recognised:
        found = _form_recipients(form, reading, patterns)
        if found:
            return report("dsn", form.name, found)
    if parts.delivery_status:
        return report("dsn", "rfc3464")
    sure = [form for form in recognised if not form.needs_recipients]
    if sure:
        return report("dsn", sure[0].name)
    if _is_autoreply(message, reading.subject, patterns):
        return report("autoreply", "autoreply")
    return report("unknown", "unknown")


# -- the parts of a report -----------------------------------------------------------------

_ROLES = {**dict.fromkeys(DELIVERY_STATUS, "delivery_status"), FEEDBACK_REPORT: "feedback",
          **dict.fromkeys(RETURNED, "returned"), "text/plain": "plain", "text/html": "html"}


@dataclass
class _Parts:
    plain: list[Message] = field(default_factory=list)
    html: list[Message] = field(default_factory=list)
    delivery_status: list[Message] = field(default_factory=list)
    feedback: list[Message] = field(default_factory=list)
    returned: list[Message] = field(default_factory=list)

    @classmethod
    def of(cls, message: Message) -> _Parts:
        """The parts of ``message`` by role; returned originals are not opened (a
        bounce of a bounce must not be read as the inner one)."""
        parts = cls()
        stack = [(message, 0)]
        seen = 0
        while stack and seen < MAX_PARTS:
            part, depth = stack.pop()
            seen += 1
            role = _ROLES.get(part.get_content_type())
            if role:
                getattr(parts, role).append(part)
            elif part.get_content_maintype() == "multipart" and depth < MAX_DEPTH:
                children = part.get_payload() if part.is_multipart() else []
                if isinstance(children, list):
                    stack.extend((p, depth + 1) for p in reversed(children[:MAX_PARTS])
                                 if isinstance(p, Message))
        return parts


def _report_text(parts: _Parts) -> str:
    """The report's words: its plain text parts, or else its HTML parts as text."""
    if parts.plain:
        texts = [_lines(_decoded(p)[:TEXT_CHARS]) for p in parts.plain]
    else:
        texts = [_lines(_html_text(_decoded(p)[:4 * TEXT_CHARS])[:TEXT_CHARS])
                 for p in parts.html]
    return "\n\n".join(texts)[:REPORT_CHARS]


def _decoded(part: Message) -> str:
    """A part's payload as text (transfer encoding and charset undone, leniently)."""
    return _text(_body(part)[:4 * TEXT_CHARS], part.get_content_charset())


def _text(raw: bytes, charset: str | None) -> str:
    """Bytes as text in ``charset``, or else UTF-8, or else Windows-1252: the other
    encoding French mail comes in undeclared."""
    if charset:
        try:
            return raw.decode(charset, "replace")
        except (LookupError, UnicodeError, ValueError, TypeError):
            pass
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", "replace")


def _lines(text: str) -> str:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").split("\n")
    return "\n".join(line[i:i + LINE_CHARS] for line in lines
                     for i in range(0, len(line) or 1, LINE_CHARS))


_ELEMENT = re.compile(r"(?i)<(style|script|head|title|pre)\b")
_CLOSING = {name: re.compile(f"(?i)</{name}\\s*>")
            for name in ("style", "script", "head", "title", "pre")}
_BLOCK_TAG = re.compile(
    r"(?i)<(?:br|/?(?:p|div|tr|li|ul|ol|h[1-6]|table|blockquote|center))\b[^<>]{0,2000}>")
_CELL_TAG = re.compile(r"(?i)</?t[dh]\b[^<>]{0,2000}>")
_TAG = re.compile(r"<[^<>]{0,2000}>")
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n[ \n]{2,}")


def _html_text(source: str) -> str:
    """HTML as lines of text, enough for patterns; linear in the input. Line breaks of
    the source count only inside ``<pre>``, as in a browser."""
    pieces: list[str] = []
    position = 0
    unclosed: set[str] = set()  # searched once to the end: no need to search again
    while (opening := _ELEMENT.search(source, position)) is not None:
        pieces.append(source[position:opening.start()].replace("\n", " "))
        name = opening.group(1).lower()
        closing = None if name in unclosed else _CLOSING[name].search(source, opening.end())
        if closing is None:
            unclosed.add(name)
        if name == "pre":
            end = closing.start() if closing else len(source)
            pieces += ["\n", source[opening.end():end], "\n"]
            position = closing.end() if closing else end
        else:
            # A hidden element left open hides nothing: a browser would show what follows.
            position = closing.end() if closing else opening.end()
    pieces.append(source[position:].replace("\n", " "))
    text = _TAG.sub("", _CELL_TAG.sub(" ", _BLOCK_TAG.sub("\n", "".join(pieces))))
    text = _SPACES.sub(" ", html.unescape(text))
    return _BLANK_LINES.sub("\n\n", "\n".join(line.strip() for line in text.split("\n")))


# -- headers -----------------------------------------------------------------------------

def _values(message: Message, name: str) -> list[str]:
    """A header's values as received: ``Message.get`` would turn raw 8-bit text (a
    French subject sent without encoded words) into replacement characters."""
    name = name.lower()
    return [str(v)[:HEADER_CHARS] for n, v in message.raw_items() if n.lower() == name][:20]


def _header(message: Message, name: str) -> str:
    return next((_unfolded(v) for v in _values(message, name)), "")


def _unfolded(value: str) -> str:
    """A header's value decoded (raw 8-bit text, RFC 2047 encoded words) on one line."""
    value = _utf8(value[:HEADER_CHARS])
    if "=?" in value:
        try:
            value = str(make_header(decode_header(value)))
        except (MessageError, LookupError, UnicodeError, ValueError, TypeError):
            pass
    return " ".join(value.split())


def _utf8(value: str) -> str:
    """Text the parser read as ASCII (other bytes kept as surrogates), read again."""
    try:
        return _text(value.encode("utf-8", "surrogateescape"), None)
    except UnicodeError:
        return value.encode("utf-8", "replace").decode("utf-8")


def _addressed_to(message: Message) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for name in ADDRESSED_TO:
        for _, address in getaddresses([_utf8(v) for v in _values(message, name)]):
            address = address.strip().strip("<>").lower()
            if "@" in address:
                found.setdefault(address, None)
    return tuple(found)


def _fields(text: str) -> list[list[tuple[str, str]]]:
    """Groups of ``Name: value`` fields separated by blank lines, names lower-cased
    (a delivery-status or feedback-report body, or headers given as text)."""
    groups: list[list[tuple[str, list[str]]]] = [[]]
    for line in text[:4 * TEXT_CHARS].splitlines():
        if not line.strip():
            if groups[-1]:
                groups.append([])
        elif line[0] in " \t":
            if groups[-1] and len(groups[-1][-1][1]) < 100:
                groups[-1][-1][1].append(line.strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            if name.strip() and " " not in name.strip():
                groups[-1].append((name.strip().lower(), [value.strip()]))
    return [[(n, " ".join(v).strip()) for n, v in g] for g in groups if g][:MAX_PARTS]


def _part_fields(part: Message) -> list[list[tuple[str, str]]]:
    payload = part.get_payload() if part.is_multipart() else None
    if isinstance(payload, list):
        return _fields(_decoded_blocks(part, [b for b in payload[:MAX_PARTS]
                                              if isinstance(b, Message)]))
    return _fields(_decoded(part))


def _body(part: Message) -> bytes:
    raw = part.get_payload(decode=True)
    return raw if isinstance(raw, bytes) else b""


def _decoded_blocks(part: Message, blocks: list[Message]) -> str:
    """The text of a part the email package split into blocks of header fields (as it
    does with message/* types, leaving an encoded body in one), put back together."""
    raw = b"\n".join(
        "".join(f"{n}: {v}\n" for n, v in b.raw_items()).encode("utf-8", "surrogateescape")
        + b"\n" + _body(b) for b in blocks)
    copy = Message()
    copy.set_payload(raw[:4 * TEXT_CHARS].decode("ascii", "surrogateescape"))
    for name in ("Content-Transfer-Encoding", "Content-Type"):
        for value in _values(part, name)[:1]:
            copy[name] = value
    return _decoded(copy)


# -- delivery reports and complaints ---------------------------------------------------------

_TYPED_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,30}[ \t]*;[ \t]*")
_CODE = re.compile(r"[245][0-9][0-9]")
_CODE_AND_STATUS = re.compile(
    r"(?<![0-9.])([245][0-9][0-9])[ -]#?([245]\.[0-9]{1,3}\.[0-9]{1,3})(?![0-9.])")
_LEADING_CODE = re.compile(r"^\W{0,3}([245][0-9][0-9])(?![0-9.])")
_STATUS = re.compile(r"(?<![0-9.])([245]\.[0-9]{1,3}\.[0-9]{1,3})(?![0-9.])")
_CONTROL = dict.fromkeys([*range(32), 127])


def _dsn_recipients(parts: list[Message]) -> list[BouncedRecipient]:
    found: list[BouncedRecipient] = []
    for part in parts:
        for group in _part_fields(part):
            values = dict(reversed(group))  # the first of a repeated field counts
            original = _address(values.get("original-recipient", ""))
            final = _address(values.get("final-recipient", ""))
            address = original if "@" in original else final or original
            if not address:
                continue
            action = values.get("action", "").strip().lower()
            status = _STATUS.match(values.get("status", "").strip())
            found.append(_recipient(
                address, action if action in ACTIONS else "",
                status.group(1) if status else "", None,
                _TYPED_VALUE.sub("", _one_line(values.get("diagnostic-code", "")))))
    return found


def _complaint_recipients(parts: _Parts) -> list[BouncedRecipient]:
    addresses: list[str] = []
    feedback_type = ""
    for part in parts.feedback:
        for group in _part_fields(part):
            for name, value in group:
                if name == "original-rcpt-to":
                    addresses.append(_address(value))
                elif name == "feedback-type" and not feedback_type:
                    feedback_type = _one_line(value)
    if not addresses:
        headers = next(_returned_headers(parts), {})
        addresses = [a for _, a in getaddresses([headers.get("to", "")]) if "@" in a]
    # A complaint is about a message that was delivered: the recipient is not gone.
    return [BouncedRecipient(a, "delivered", "", None, feedback_type)
            for a in dict.fromkeys(a for a in addresses if a)]


def _address(value: str) -> str:
    value = _TYPED_VALUE.sub("", _one_line(value))
    return value.strip().strip("<>").strip()[:320]


def _one_line(value: str) -> str:
    return " ".join(value[:4 * DIAGNOSTIC_CHARS].translate(_CONTROL).split())


def _recipient(address: str, action: str, status: str, code: int | None,
               diagnostic: str) -> BouncedRecipient:
    """A recipient, with what the report left out derived from what it gave."""
    diagnostic = _one_line(diagnostic)[:DIAGNOSTIC_CHARS]
    both = _CODE_AND_STATUS.search(diagnostic)
    if code is None:
        leading = _LEADING_CODE.match(diagnostic)
        code = int(both.group(1)) if both else int(leading.group(1)) if leading else None
    if not status:
        alone = _STATUS.search(diagnostic)
        status = both.group(2) if both else alone.group(1) if alone else ""
    if not status and code is not None and code >= 400:
        status = f"{code // 100}.0.0"
    if not action:
        action = {"2": "delivered", "4": "delayed"}.get(status[:1], "failed")
    return BouncedRecipient(address, action, status, code, diagnostic)


def _returned_headers(parts: _Parts) -> Iterator[dict[str, str]]:
    """The header fields of each returned original, names lower-cased."""
    for part in parts.returned:
        yield dict(reversed(next(iter(_part_fields(part)), [])))


def _original_message_id(parts: _Parts, copy: str, patterns: Patterns) -> str | None:
    for headers in _returned_headers(parts):
        if headers.get("message-id"):
            return headers["message-id"][:1000]
    found = _first_match(patterns.quoted_message_id, copy)
    return found.group("id") if found else None


# -- non-standard forms ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Reading:
    """What a form's patterns are applied to (``body``: the text without the copy)."""

    message: Message
    subject: str
    sender: str
    body: str

    def value(self, name: str) -> str:
        known = {"subject": self.subject, "from": self.sender, "body": self.body}
        return known[name] if name in known else _header(
            self.message, name.removeprefix("header:"))

    def recognises(self, form: Form) -> bool:
        return any(all(p.search(self.value(name)) for name, p in alternative)
                   for alternative in form.recognise)

    def matches(self, patterns: Iterable[re.Pattern[str]]) -> bool:
        return any(p.search(self.subject) or p.search(self.body) for p in patterns)


@dataclass
class _Found:
    address: str
    code: int | None = None
    status: str = ""
    diagnostic: str = ""

    def take(self, groups: Mapping[str, str | None]) -> None:
        """Fills what is still missing from a match's named groups."""
        if self.code is None and _CODE.fullmatch(groups.get("code") or ""):
            self.code = int(groups["code"] or 0)
        if not self.status and _STATUS.fullmatch(groups.get("status") or ""):
            self.status = groups["status"] or ""
        if not self.diagnostic and groups.get("diagnostic"):
            self.diagnostic = groups["diagnostic"] or ""


def _form_recipients(form: Form, reading: _Reading, patterns: Patterns) -> list[BouncedRecipient]:
    hits = sorted((m for p in form.recipients
                   for _, m in zip(range(MAX_RECIPIENTS), p.finditer(reading.body),
                                   strict=False)),
                  key=lambda m: m.start())
    found: dict[str, _Found] = {}
    for index, match in enumerate(hits):
        address = _address(match.group("address"))
        if not address:
            continue
        entry = found.setdefault(address.lower(), _Found(address))
        entry.take(match.groupdict())
        end = hits[index + 1].start() if index + 1 < len(hits) else len(reading.body)
        block = reading.body[match.start():min(end, match.start() + BLOCK_CHARS)]
        entry.take(_groups(form.diagnostic, block))
    if not found:
        for name in form.recipient_headers:
            for value in _values(reading.message, name):
                for _, address in getaddresses([_utf8(value)]):
                    if "@" in address:
                        found.setdefault(address.lower(), _Found(address))
    whole = _groups(form.diagnostic, reading.body)
    delayed = reading.matches(patterns.delayed + form.delayed)
    out = []
    for entry in list(found.values())[:MAX_RECIPIENTS]:
        entry.take(whole)
        diagnostic = _one_line(entry.diagnostic)
        for strip in form.diagnostic_strip:
            diagnostic = strip.sub("", diagnostic)
        recipient = _recipient(entry.address, "failed", entry.status, entry.code, diagnostic)
        # A temporary status in a report that does not say it gave up: still trying.
        if delayed or (recipient.status.startswith("4")
                       and not reading.matches(patterns.given_up)):
            recipient = replace(recipient, action="delayed")
        out.append(recipient)
    return out


def _first_match(patterns: Iterable[re.Pattern[str]], text: str) -> re.Match[str] | None:
    return next((m for p in patterns if (m := p.search(text)) is not None), None)


def _groups(patterns: Iterable[re.Pattern[str]], text: str) -> dict[str, str | None]:
    match = _first_match(patterns, text)
    return match.groupdict() if match else {}


def _is_autoreply(message: Message, subject: str, patterns: Patterns) -> bool:
    return (any(p.search(_header(message, name)) for name, p in patterns.autoreply_headers
                if _values(message, name))
            or any(p.search(subject) for p in patterns.autoreply_subject))
