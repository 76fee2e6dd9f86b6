"""Message validation and rendering: what a recipient's mail program will read."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta, timezone
from email.header import decode_header
from email.message import EmailMessage, MIMEPart
from email.parser import BytesParser, Parser
from email.policy import SMTP
from email.policy import default as default_policy
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import postier.core.message
from postier.core.message import (
    MAX_RECIPIENTS,
    AttachmentIn,
    BuiltMessage,
    InvalidMessageField,
    MessageIn,
    _alternative,
    _mime_body,
    _single_text_part,
    _text_cte,
    build_message,
    make_message_id,
)
from postier.core.policy import SenderDecision, clean_display_name, decide_sender
from postier.errors import InvalidAddress, InvalidInput, PostierError, TooLarge

ALLOWED = ["ac-lyon.fr", "*.ac-lyon.fr"]
SCHOOL = {
    "establishment_name": "Collège Jean Moulin",
    "establishment_address": "ne-pas-repondre@ac-lyon.fr",
}
MESSAGE_ID = "<0123456789abcdef0123456789abcdef@ac-lyon.fr>"
DATE = datetime(2025, 3, 14, 9, 26, 53, tzinfo=timezone(timedelta(hours=1)))


def inside(name: str = "Jean Dupont", **kwargs: Any) -> SenderDecision:
    return decide_sender(
        user_address="jean@ac-lyon.fr", user_name=name, allowed_domains=ALLOWED, **SCHOOL, **kwargs
    )


def outside(**kwargs: Any) -> SenderDecision:
    return decide_sender(
        user_address="alice@gmail.com",
        user_name="Alice",
        allowed_domains=ALLOWED,
        **SCHOOL,
        **kwargs,
    )


def build(
    decision: SenderDecision | None = None, max_size: int = 25 * 1024 * 1024, **fields: Any
) -> BuiltMessage:
    fields.setdefault("to", ["parent@gmail.com"])
    msg = MessageIn.model_validate(fields)
    return build_message(
        msg, decision or inside(), message_id=MESSAGE_ID, date=DATE, max_size=max_size
    )


def parse(data: bytes) -> EmailMessage:
    msg = BytesParser(policy=default_policy).parsebytes(data)
    assert isinstance(msg, EmailMessage)
    return msg


def utf8_headers(data: bytes) -> EmailMessage:
    """Headers of an SMTPUTF8 message: BytesParser reads headers as ASCII, so a reader of
    such messages decodes them as UTF-8 first (RFC 6532)."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8") + "\r\n\r\n"
    msg = Parser(policy=default_policy).parsestr(head, headersonly=True)
    assert isinstance(msg, EmailMessage)
    return msg


def structure(part: EmailMessage) -> str:
    if part.is_multipart():
        children = ",".join(structure(p) for p in part.iter_parts())
        return f"{part.get_content_type()}[{children}]"
    return part.get_content_type()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def lines_of(text: str) -> list[str]:
    """Lines as a reader sees them: CR, LF and CRLF all end a line."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def same_body(got: str, sent: str) -> bool:
    # The encoder ends the body with a line break if it has none; the rest is exact.
    return lines_of(got) == lines_of(sent if sent.endswith(("\n", "\r")) else sent + "\n")


# --------------------------------------------------------------------------- headers


def test_a_simple_message() -> None:
    built = build(subject="Modification de l'emploi du temps", text="Bonjour,\nà jeudi.")
    msg = parse(built.data)
    assert msg.keys() == [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
    ]
    assert str(msg["From"]) == "Jean Dupont <jean@ac-lyon.fr>"
    assert str(msg["To"]) == "parent@gmail.com"
    assert msg["Subject"] == "Modification de l'emploi du temps"
    assert msg["Date"].datetime == DATE
    assert msg["Message-ID"] == MESSAGE_ID
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert lines_of(msg.get_content()) == ["Bonjour,", "à jeudi.", ""]
    assert built.envelope_from == "jean@ac-lyon.fr"
    assert built.recipients == ("parent@gmail.com",)
    assert built.message_id == MESSAGE_ID
    assert built.subject == "Modification de l'emploi du temps"
    assert built.size == len(built.data)
    assert built.smtputf8 is False
    assert not msg.defects


def test_outside_the_allowed_domains() -> None:
    built = build(outside(), text="x")
    msg = parse(built.data)
    assert msg["From"].addresses[0].display_name == "Collège Jean Moulin"
    assert msg["From"].addresses[0].addr_spec == "ne-pas-repondre@ac-lyon.fr"
    assert str(msg["Reply-To"]) == "alice@gmail.com"
    assert built.envelope_from == "ne-pas-repondre@ac-lyon.fr"
    assert b"Reply-To: alice@gmail.com\r\n" in built.data


def test_cc_reply_to_and_x_headers_in_order() -> None:
    built = build(
        inside(message_reply_to=["vie.scolaire@ac-lyon.fr"]),
        to=["a@x.fr", "b@x.fr"],
        cc=["c@x.fr"],
        headers={"X-Classe": "4B", "X-Trimestre": "2"},
    )
    msg = parse(built.data)
    assert msg.keys()[:9] == [
        "From",
        "Reply-To",
        "To",
        "Cc",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "X-Classe",
    ]
    assert msg["X-Trimestre"] == "2"
    assert [a.addr_spec for a in msg["To"].addresses] == ["a@x.fr", "b@x.fr"]
    assert [a.addr_spec for a in msg["Cc"].addresses] == ["c@x.fr"]
    assert str(msg["Reply-To"]) == "vie.scolaire@ac-lyon.fr"


def test_bcc_is_in_the_envelope_only() -> None:
    built = build(to=["a@x.fr"], cc=["A@X.FR"], bcc=["cache@x.fr", "a@x.fr", "Cache@x.fr"])
    assert b"cache" not in built.data.lower()
    assert "Bcc" not in parse(built.data)
    # One copy per mailbox, first spelling kept, To then Cc then Bcc.
    assert built.recipients == ("a@x.fr", "cache@x.fr")


def test_message_id_is_the_one_given() -> None:
    msg = MessageIn(to=["a@x.fr"], text="x")
    first = build_message(msg, inside(), message_id=MESSAGE_ID, date=DATE)
    again = build_message(msg, inside(), message_id=MESSAGE_ID, date=DATE)
    assert first.message_id == again.message_id == MESSAGE_ID
    assert parse(first.data)["Message-ID"] == MESSAGE_ID
    assert first.data == again.data, "a text message renders the same bytes every time"


@pytest.mark.parametrize(
    "bad", ["0123@ac-lyon.fr", "<a@b>\r\nBcc: x@y.fr", "<a b@c>", "<@c>", "<a@b", "", "<a<b@c>"]
)
def test_a_malformed_message_id_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        build_message(MessageIn(to=["a@x.fr"]), inside(), message_id=bad)


def test_make_message_id() -> None:
    ids = {make_message_id("ac-lyon.fr") for _ in range(1000)}
    assert len(ids) == 1000
    for message_id in ids:
        assert re.fullmatch(r"<[0-9a-f]{32}@ac-lyon\.fr>", message_id)
    assert make_message_id("ÉCOLES.fr").endswith("@xn--coles-9ra.fr>")
    for bad in ("bad domain", "a>b", "", "x\r\ny"):
        with pytest.raises(ValueError):
            make_message_id(bad)


def test_dates() -> None:
    naive = datetime(2025, 3, 14, 8, 0, 0)
    assert parse(build(text="x").data)["Date"].datetime == DATE
    msg = MessageIn(to=["a@x.fr"])
    got = parse(build_message(msg, inside(), message_id=MESSAGE_ID, date=naive).data)
    assert got["Date"].datetime == naive.replace(tzinfo=UTC)
    now = parse(build_message(msg, inside(), message_id=MESSAGE_ID).data)["Date"].datetime
    assert abs(now - datetime.now(UTC)) < timedelta(seconds=5)


def test_the_date_of_now_follows_the_clock_to_the_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    import postier.core.message as message_module

    clock = [1_700_000_000.25]
    monkeypatch.setattr(message_module, "time", types.SimpleNamespace(time=lambda: clock[0]))
    msg = MessageIn(to=["a@x.fr"])

    def date_now() -> datetime:
        built = build_message(msg, inside(), message_id=MESSAGE_ID)
        return parse(built.data)["Date"].datetime

    assert date_now() == datetime.fromtimestamp(1_700_000_000, UTC)
    clock[0] += 0.5  # the same second: the same Date
    assert date_now() == datetime.fromtimestamp(1_700_000_000, UTC)
    clock[0] += 1.0
    assert date_now() == datetime.fromtimestamp(1_700_000_001, UTC)


def test_many_recipients_fold_and_parse_back() -> None:
    to = [f"parent.eleve.{i}@gmail.com" for i in range(300)]
    built = build(to=to)
    assert [a.addr_spec for a in parse(built.data)["To"].addresses] == to
    _assert_wire_format(built.data)


def test_internationalised_domains_travel_as_idna() -> None:
    built = build(to=["parent@écoles.fr"], cc=["Prof@ÉCOLES.fr"])
    assert built.smtputf8 is False
    assert built.recipients == ("parent@xn--coles-9ra.fr", "Prof@xn--coles-9ra.fr")
    assert b"To: parent@xn--coles-9ra.fr\r\n" in built.data
    built.data.decode("ascii")


def test_a_non_ascii_local_part_needs_smtputf8() -> None:
    built = build(to=["jöhn@écoles.fr", "b@écoles.fr"], subject="Été")
    assert built.smtputf8 is True
    assert built.recipients == ("jöhn@écoles.fr", "b@écoles.fr")
    msg = utf8_headers(built.data)
    assert [a.addr_spec for a in msg["To"].addresses] == ["jöhn@écoles.fr", "b@écoles.fr"]
    assert msg["Subject"] == "Été"
    assert b"To: j\xc3\xb6hn@\xc3\xa9coles.fr, b@\xc3\xa9coles.fr\r\n" in built.data
    assert same_body(parse(built.data).get_content(), "")


def test_a_non_ascii_sender_needs_smtputf8() -> None:
    d = decide_sender(
        user_address="élève@ac-lyon.fr", user_name="Élève", allowed_domains=ALLOWED, **SCHOOL
    )
    built = build(d)
    assert built.smtputf8 is True
    assert built.envelope_from == "élève@ac-lyon.fr"
    sender = utf8_headers(built.data)["From"].addresses[0]
    assert (sender.display_name, sender.addr_spec) == ("Élève", "élève@ac-lyon.fr")


@pytest.mark.parametrize(
    ("subject", "why"),
    [
        ("=?utf-8?q?Coucou?=", "looks like an encoded word"),
        ("Réunion parents–professeurs du 2e trimestre, salle 104 (bâtiment B)", "non-ASCII"),
        ("word " * 150, "long, folded"),
        ("x" * 990, "one word longer than a line can fold"),
        ("a\tb  c", "tabs and double spaces"),
        ("", "empty"),
        ("日本語の件名" * 30, "base64 encoded words"),
    ],
)
def test_subjects_round_trip(subject: str, why: str) -> None:
    built = build(subject=subject)
    assert parse(built.data)["Subject"] == subject.strip(), why
    _assert_wire_format(built.data)


def test_subject_surrounding_spaces_are_dropped() -> None:
    assert MessageIn(to=["a@x.fr"], subject="  Bonjour \t").subject == "Bonjour"


@pytest.mark.parametrize(
    "name",
    [
        "Jean Dupont",
        "Dupont, Jean",
        'Jean "JD" Dupont',
        "Jean\\Dupont",
        "Collège Jean Moulin",
        "Lycée Général et Technologique Édouard Herriot de Lyon",
        "=?utf-8?q?Admin?=",
        "Jean  Dupont",
        "Ωmega (école)",
    ],
)
def test_display_names_round_trip(name: str) -> None:
    built = build(inside(name=name))
    address = parse(built.data)["From"].addresses
    assert len(address) == 1
    assert address[0].addr_spec == "jean@ac-lyon.fr"
    assert address[0].display_name == clean_display_name(name)
    assert _rfc2047_display_name(built.data) == clean_display_name(name)


def test_hostile_display_name_adds_no_header() -> None:
    built = build(inside(name="Jean\r\nBcc: victim@evil.example\r\n\r\nbody"))
    msg = parse(built.data)
    assert "Bcc" not in msg
    assert msg.keys().count("From") == 1
    assert msg["From"].addresses[0].addr_spec == "jean@ac-lyon.fr"


def test_a_decision_cannot_smuggle_a_header() -> None:
    with pytest.raises(ValueError):
        SenderDecision(
            "Jean\nBcc: v@x.fr", "jean@ac-lyon.fr", (), "jean@ac-lyon.fr", "inside_allowed",
            "jean@ac-lyon.fr", None, (),
        )  # fmt: skip


# --------------------------------------------------------------------------- body


def attachment(filename: str = "a.pdf", content_type: str = "application/pdf") -> dict[str, str]:
    return {"filename": filename, "content_type": content_type, "content": b64(b"%PDF")}


ALTERNATIVE = "multipart/alternative[text/plain,text/html]"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"text": "Bonjour"}, "text/plain"),
        ({"html": "<p>Bonjour</p>"}, "text/html"),
        ({"text": "Bonjour", "html": "<p>Bonjour</p>"}, ALTERNATIVE),
        ({}, "text/plain"),
        ({"text": ""}, "text/plain"),
        (
            {"text": "Bonjour", "attachments": [attachment()]},
            "multipart/mixed[text/plain,application/pdf]",
        ),
        (
            {"html": "<p>x</p>", "attachments": [{"filename": "a.bin", "content": ""}]},
            "multipart/mixed[text/html,application/octet-stream]",
        ),
        (
            {
                "text": "Bonjour",
                "html": "<p>Bonjour</p>",
                "attachments": [attachment(), attachment("b.png", "IMAGE/PNG")],
            },
            f"multipart/mixed[{ALTERNATIVE},application/pdf,image/png]",
        ),
        (
            {"attachments": [attachment("a.txt", "text/plain")]},
            "multipart/mixed[text/plain,text/plain]",
        ),
    ],
)
def test_mime_structure(fields: dict[str, Any], expected: str) -> None:
    built = build(**fields)
    msg = parse(built.data)
    assert structure(msg) == expected
    assert not msg.defects
    _assert_wire_format(built.data)


def test_neither_text_nor_html_gives_an_empty_text_part() -> None:
    msg = parse(build().data)
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().strip() == ""


def test_text_and_html_bodies_round_trip() -> None:
    built = build(text="Bonjour é\r\nligne 2\rligne 3\n", html="<p>Bonjour é</p>")
    text, html = parse(built.data).iter_parts()
    assert lines_of(text.get_content()) == ["Bonjour é", "ligne 2", "ligne 3", ""]
    assert lines_of(html.get_content()) == ["<p>Bonjour é</p>", ""]


@pytest.mark.parametrize(
    ("text", "cte"),
    [
        ("Bonjour", "7bit"),
        ("Bonjour é", "8bit"),
        ("x" * 998, "7bit"),  # RFC 5322 allows 998 octets, the email package alone stops at 78
        ("é" * 499, "8bit"),
        ("x" * 999, "quoted-printable"),
        ("é" * 500, "base64"),
        ("a\n" + "y" * 5000 + "\nz", "quoted-printable"),
    ],
)
def test_transfer_encoding(text: str, cte: str) -> None:
    for fields in ({"text": text}, {"html": text}, {"text": text, "html": text}):
        built = build(**fields)
        parts = list(parse(built.data).walk())
        leaves = [p for p in parts if not p.is_multipart()]
        for leaf in leaves:
            assert leaf["Content-Transfer-Encoding"] == cte
            assert same_body(leaf.get_content(), text)
        _assert_wire_format(built.data)


@pytest.mark.parametrize(
    ("filename", "content_type", "data"),
    [
        ("emploi-du-temps.pdf", "application/pdf", b"%PDF-1.4\n" + bytes(range(256)) * 8),
        ("vide.bin", "application/octet-stream", b""),
        ("élèves 4ème B.csv", "text/csv", "nom;prénom\r\nDupont;Jean\n".encode("latin-1")),
        ('rapport "final".txt', "text/plain", b"a\x00b\r\n\rc"),
        ("a;b=c, d.txt", "text/plain", b"x"),
        ("très " * 40 + ".odt", "application/vnd.oasis.opendocument.text", b"PK\x03\x04"),
        ("学校の時間割.xlsx", "application/vnd.ms-excel", b"\xd0\xcf\x11\xe0"),
        ("  espaces.txt  ", "text/plain", b" "),
    ],
)
def test_attachments_round_trip(filename: str, content_type: str, data: bytes) -> None:
    built = build(
        text="ci-joint",
        attachments=[{"filename": filename, "content_type": content_type, "content": b64(data)}],
    )
    msg = parse(built.data)
    _, part = msg.iter_parts()
    assert part.get_filename() == filename.strip()
    assert part.get_content_type() == content_type
    assert part.get_payload(decode=True) == data
    assert part.get_content_disposition() == "attachment"
    _assert_wire_format(built.data)


def test_base64_with_line_breaks_is_accepted() -> None:
    data = bytes(range(256)) * 4
    wrapped = base64.encodebytes(data).decode("ascii")  # 76-character lines
    attachment = AttachmentIn(filename="a.bin", content=wrapped)
    assert attachment.data == data


# --------------------------------------------------------------------------- validation


def _errors(raw: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        MessageIn.model_validate(raw)
    return list(info.value.errors())


def fields(**kwargs: Any) -> dict[str, Any]:
    return {"to": ["a@x.fr"], **kwargs}


def attached(**kwargs: Any) -> dict[str, Any]:
    return fields(attachments=[{"filename": "a", "content": "", **kwargs}])


FILENAME = ("attachments", 0, "filename")
CONTENT = ("attachments", 0, "content")
CONTENT_TYPE = ("attachments", 0, "content_type")
BAD = InvalidMessageField
NOT_X = "only headers whose name starts with X-"
BAD_NAME = "not a valid header name"
CONTAINER = "send it as application/octet-stream"


@pytest.mark.parametrize(
    ("raw", "loc", "cause", "message_part"),
    [
        ({"to": ["a@x.fr", "Bob <b@x.fr>"]}, ("to", 1), InvalidAddress, "without a name"),
        ({"to": ["a@x.fr\r\nBcc: v@x.fr"]}, ("to", 0), InvalidAddress, "line breaks"),
        (fields(cc=["nope"]), ("cc", 0), InvalidAddress, "nope"),
        (fields(bcc=["", "b@x.fr"]), ("bcc", 0), InvalidAddress, "empty"),
        (fields(reply_to="r@x"), ("reply_to", 0), InvalidAddress, "period"),
        ({"to": ["a@x.fr"], "from": "f@x.fr>"}, ("from",), InvalidAddress, "without a name"),
        (fields(subject="a\r\nBcc: v@x.fr"), ("subject",), BAD, "Line breaks are not allowed"),
        (fields(subject="a\nb"), ("subject",), BAD, "Line breaks are not allowed in the subject"),
        (fields(subject="a\u2028b"), ("subject",), BAD, "Line breaks"),
        (fields(subject="a\x00b"), ("subject",), BAD, "U+0000"),
        (fields(subject="a\x1bb"), ("subject",), BAD, "U+001B"),
        (fields(headers={"Bcc": "v@x.fr"}), ("headers",), BAD, NOT_X),
        (fields(headers={"From": "v@x.fr"}), ("headers",), BAD, NOT_X),
        (fields(headers={"Content-Type": "text/html"}), ("headers",), BAD, NOT_X),
        (fields(headers={"X-": "1"}), ("headers",), BAD, BAD_NAME),
        (fields(headers={"X-A B": "1"}), ("headers",), BAD, BAD_NAME),
        (fields(headers={"X-A:B": "1"}), ("headers",), BAD, BAD_NAME),
        (fields(headers={"X-É": "1"}), ("headers",), BAD, BAD_NAME),
        (fields(headers={"X-" + "a" * 80: "1"}), ("headers",), BAD, "too long"),
        (fields(headers={"X-A": "1", "x-a": "2"}), ("headers",), BAD, "twice"),
        (fields(headers={"X-A": "1\r\nBcc: v@x.fr"}), ("headers",), BAD, "value of header X-A"),
        (fields(headers={"X-A": "1\x00"}), ("headers",), BAD, "U+0000"),
        (fields(text="a\x00b"), ("text",), BAD, "U+0000"),
        (fields(html="\udfff"), ("html",), BAD, "U+DFFF"),
        (fields(idempotency_key="k\n"), ("idempotency_key",), BAD, "Line breaks"),
        (attached(filename="../etc/passwd"), FILENAME, BAD, "without a folder"),
        (attached(filename="C:\\a.txt"), FILENAME, BAD, "without a folder"),
        (attached(filename=".."), FILENAME, BAD, "without a folder"),
        (attached(filename="a\r\n.txt"), FILENAME, BAD, "Line breaks"),
        (attached(filename="a\x00.txt"), FILENAME, BAD, "U+0000"),
        (attached(filename="   "), FILENAME, BAD, "empty"),
        (attached(content="%%%"), CONTENT, BAD, "not valid base64"),
        (attached(content="data:application/pdf;base64,JVBERg=="), CONTENT, BAD, "data: prefix"),
        (attached(content="abc"), CONTENT, BAD, "base64"),
        (attached(content_type="pdf"), CONTENT_TYPE, BAD, "type/subtype"),
        (attached(content_type="text/plain; charset=utf-8"), CONTENT_TYPE, BAD, "type/subtype"),
        (attached(content_type="text/plain\r\nX: y"), CONTENT_TYPE, BAD, "type/subtype"),
        (attached(content_type="message/rfc822"), CONTENT_TYPE, BAD, CONTAINER),
        (attached(content_type="multipart/mixed"), CONTENT_TYPE, BAD, CONTAINER),
    ],
)
def test_invalid_fields_are_reported_where_they_are(
    raw: dict[str, Any], loc: tuple[Any, ...], cause: type[PostierError], message_part: str
) -> None:
    errors = _errors(raw)
    assert len(errors) == 1, errors
    assert errors[0]["loc"] == loc
    error = errors[0]["ctx"]["error"]
    assert isinstance(error, cause)
    assert isinstance(error, InvalidInput) and isinstance(error, ValueError)
    assert message_part in error.message("en"), error.message("en")


@pytest.mark.parametrize(
    ("raw", "loc", "kind"),
    [
        ({}, ("to",), "missing"),
        ({"to": []}, ("to",), "too_short"),
        ({"to": "a@x.fr"}, ("to",), "list_type"),
        (fields(subject="x" * 999), ("subject",), "string_too_long"),
        (fields(priority="urgent"), ("priority",), "literal_error"),
        (fields(subject="\ud800"), ("subject",), "string_unicode"),
        (fields(idempotency_key=""), ("idempotency_key",), "string_too_short"),
        (fields(idempotency_key="k" * 201), ("idempotency_key",), "string_too_long"),
        (fields(sender="x"), ("sender",), "extra_forbidden"),
        (attached(filename=""), FILENAME, "string_too_short"),
        (attached(filename="a" * 256), FILENAME, "string_too_long"),
        (fields(attachments=[{"filename": "a"}]), CONTENT, "missing"),
        (fields(headers={"X-A": "v" * 999}), ("headers", "X-A"), "string_too_long"),
    ],
)
def test_schema_limits(raw: dict[str, Any], loc: tuple[Any, ...], kind: str) -> None:
    errors = _errors(raw)
    assert (errors[0]["loc"], errors[0]["type"]) == (loc, kind)


def test_accepted_shapes() -> None:
    msg = MessageIn.model_validate(
        {
            "from": "Jean@AC-LYON.FR",
            "to": [" parent@gmail.com "],
            "reply_to": "vie.scolaire@ac-lyon.fr",
            "headers": {"x-classe": " 4B "},
            "priority": "bulk",
            "idempotency_key": "4f1c-import-2025",
        }
    )
    assert msg.from_ == "Jean@ac-lyon.fr"
    assert msg.to == ["parent@gmail.com"]
    assert msg.reply_to == ["vie.scolaire@ac-lyon.fr"]
    assert msg.headers == {"x-classe": "4B"}
    assert MessageIn(from_="a@x.fr", to=["b@x.fr"]).from_ == "a@x.fr"  # by field name too
    schema = MessageIn.model_json_schema(by_alias=True)
    assert "from" in schema["properties"]
    assert schema["properties"]["to"]["description"]


def test_recipient_limit_counts_each_mailbox_once() -> None:
    many = [f"p{i}@x.fr" for i in range(MAX_RECIPIENTS)]
    assert len(MessageIn(to=many[:500], cc=many[500:], bcc=[a.upper() for a in many]).to) == 500
    errors = _errors({"to": many[:600], "cc": many[600:], "bcc": ["extra@x.fr"]})
    error = errors[0]["ctx"]["error"]
    assert isinstance(error, InvalidMessageField)
    assert error.params == {"count": MAX_RECIPIENTS + 1, "limit": MAX_RECIPIENTS}
    assert "1001 recipients" in error.message()
    assert _errors({"to": [*many, "extra@x.fr"]})[0]["type"] == "too_long"


def test_size_limit() -> None:
    fields: dict[str, Any] = {
        "text": "x",
        "attachments": [{"filename": "big.bin", "content": b64(bytes(30_000))}],
    }
    size = build(**fields).size
    assert build(max_size=size, **fields).size == size  # the limit itself is allowed
    with pytest.raises(TooLarge) as info:
        build(max_size=size - 1, **fields)
    assert info.value.params == {"size": size, "limit": size - 1}
    assert info.value.http_status == 413


# --------------------------------------------------------------------------- properties

_SAFE_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=120
)
_ANY_TEXT = st.text(max_size=120)
_TEXT = st.one_of(_SAFE_TEXT, _ANY_TEXT, st.sampled_from(["=?utf-8?q?x?=", " a  b ", "é" * 80]))
_BODY = st.one_of(st.none(), _ANY_TEXT, st.text(max_size=2000))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    subject=_TEXT,
    name=_TEXT,
    header_value=_TEXT,
    text=_BODY,
    html=_BODY,
    cc=st.booleans(),
    reply_to=st.booleans(),
)
def test_any_text_either_is_refused_or_round_trips(
    subject: str,
    name: str,
    header_value: str,
    text: str | None,
    html: str | None,
    cc: bool,
    reply_to: bool,
) -> None:
    raw: dict[str, Any] = {
        "to": ["parent@gmail.com"],
        "subject": subject,
        "headers": {"X-Note": header_value},
        "text": text,
        "html": html,
    }
    if cc:
        raw["cc"] = ["prof@ac-lyon.fr"]
    raw["bcc"] = ["hidden@ac-lyon.fr"]
    try:
        msg = MessageIn.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors():
            cause = (error.get("ctx") or {}).get("error")
            assert isinstance(cause, InvalidInput) or error["type"] == "string_too_long", error
        event("refused")
        return
    event("built")
    decision = inside(name=name, message_reply_to=["r@ac-lyon.fr"] if reply_to else [])
    built = build_message(msg, decision, message_id=MESSAGE_ID, date=DATE)
    _assert_wire_format(built.data)
    parsed = parse(built.data)

    expected = ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "X-Note"]
    expected += ["Reply-To"] if reply_to else []
    expected += ["Cc"] if cc else []
    expected += ["Content-Type"]
    single = text is None or html is None
    expected += ["Content-Transfer-Encoding"] if single else []
    assert sorted(parsed.keys()) == sorted(expected)
    assert b"hidden" not in built.data
    assert "hidden@ac-lyon.fr" in built.recipients

    assert parsed["Subject"] == msg.subject == subject.strip(" \t")
    assert parsed["X-Note"] == header_value.strip(" \t")
    sender = parsed["From"].addresses
    assert len(sender) == 1 and sender[0].addr_spec == "jean@ac-lyon.fr"
    assert _rfc2047_display_name(built.data) == clean_display_name(name)
    assert not parsed.defects

    leaves = [p for p in parsed.walk() if not p.is_multipart()]
    sent = [text or ""] if html is None else [html] if text is None else [text, html]
    assert len(leaves) == len(sent)
    for leaf, body in zip(leaves, sent, strict=True):
        assert same_body(leaf.get_content(), body)


_FILENAME = st.one_of(
    st.text(min_size=1, max_size=80),
    st.from_regex(r"[a-zA-Z0-9 ._()'\"=?;,-]{1,60}\.[a-z]{3}", fullmatch=True),
)


@settings(max_examples=200, deadline=None)
@given(
    files=st.lists(
        st.tuples(
            _FILENAME,
            st.binary(max_size=3000),
            st.sampled_from(["application/pdf", "text/plain", "image/png", "application/x-y"]),
        ),
        min_size=1,
        max_size=4,
    ),
    html=st.booleans(),
)
def test_attachments_round_trip_byte_for_byte(
    files: list[tuple[str, bytes, str]], html: bool
) -> None:
    raw = {
        "to": ["a@x.fr"],
        "text": "voir pièces jointes",
        "html": "<p>voir</p>" if html else None,
        "attachments": [
            {"filename": name, "content": b64(data), "content_type": ct} for name, data, ct in files
        ],
    }
    try:
        msg = MessageIn.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors():
            assert error["loc"][-1] == "filename", error
        event("refused")
        return
    event("built")
    built = build_message(msg, inside(), message_id=MESSAGE_ID, date=DATE)
    _assert_wire_format(built.data)
    parsed = parse(built.data)
    first, *attached = parsed.iter_parts()
    assert first.get_content_type() == ("multipart/alternative" if html else "text/plain")
    assert len(attached) == len(files)
    for part, given_in, (_, data, ct) in zip(attached, msg.attachments, files, strict=True):
        assert part.get_filename() == given_in.filename
        assert part.get_content_type() == ct
        assert part.get_payload(decode=True) == data


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(_ANY_TEXT, st.text(max_size=3000)), subtype=st.sampled_from(["plain", "html"])
)
def test_the_fast_text_path_matches_the_email_package(text: str, subtype: str) -> None:
    try:
        msg = MessageIn(to=["a@x.fr"], **{"text" if subtype == "plain" else "html": text})
    except ValidationError:
        return
    fast = _single_text_part(text, subtype)
    event("fast path" if fast is not None else "email package")
    if fast is not None:
        assert fast == _mime_body(msg, SMTP)


BOUNDARY = "=_0123456789abcdef0123456789abcdef"


@settings(max_examples=200, deadline=None)
@given(
    text=st.one_of(_ANY_TEXT, st.text(max_size=2000)),
    html=st.one_of(_ANY_TEXT, st.text(max_size=2000)),
)
def test_the_fast_alternative_matches_the_email_package(text: str, html: str) -> None:
    try:
        MessageIn(to=["a@x.fr"], text=text, html=html)
    except ValidationError:
        return
    fast = _alternative(text, html, boundary=BOUNDARY)
    event("fast path" if fast is not None else "email package")
    if fast is None:
        return
    root = MIMEPart(policy=SMTP)
    root.set_content(text, cte=_text_cte(text))
    root.make_alternative(boundary=BOUNDARY)
    root.add_alternative(html, subtype="html", cte=_text_cte(html))
    assert fast == root.as_bytes()


def test_the_boundary_never_occurs_in_the_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = iter(["a" * 32, "b" * 32])
    monkeypatch.setattr(postier.core.message.secrets, "token_hex", lambda n: next(drawn))
    built = build(text="--=_" + "a" * 32, html="<p>x</p>")
    assert b'boundary="=_' + b"b" * 32 + b'"' in built.data
    text, _ = parse(built.data).iter_parts()
    assert lines_of(text.get_content()) == ["--=_" + "a" * 32, ""]


# --------------------------------------------------------------------------- helpers


def _assert_wire_format(data: bytes) -> None:
    """CRLF line ends only, no line over 998 octets, headers in ASCII unless SMTPUTF8."""
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b""), "a bare LF"
    assert b"\r" not in data.replace(b"\r\n", b""), "a bare CR"
    for line in data.split(b"\r\n"):
        assert len(line) <= 998


_EW = re.compile(r"=\?[^?]+\?[bBqQ]\?[^?]*\?=")


def _rfc2047_display_name(data: bytes) -> str:
    """The From display name as RFC 2047 says to read it.

    Python's parser keeps the spaces between two adjacent encoded words of a phrase, which
    RFC 2047 section 6.2 says to ignore and real mail programs do ignore; this reader
    follows the RFC so that long non-ASCII names are checked as people will see them.
    """
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    unfolded = re.sub(r"\r\n(?=[ \t])", "", head)
    line = next(h for h in unfolded.split("\r\n") if h.startswith("From: "))
    value = line[len("From: ") :]
    if not value.endswith(">"):
        return ""  # a bare address, no name
    phrase = value[: value.rindex(" <")]
    if phrase.startswith('"'):
        return re.sub(r"\\(.)", r"\1", phrase[1:-1])
    out: list[str] = []
    previous_ew = False
    for word in phrase.split(" "):
        if _EW.fullmatch(word):
            ((raw, charset),) = decode_header(word)
            assert isinstance(raw, bytes) and charset
            if out and not previous_ew:
                out.append(" ")
            out.append(raw.decode(charset))
            previous_ew = True
        else:
            if out:
                out.append(" ")
            out.append(word)
            previous_ew = False
    return "".join(out)
