"""The quick checks and renderings that batch acceptance relies on give exactly the answers
of the plain, slower code they replace (kept here as the reference)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from email.policy import SMTP
from email.utils import format_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from postier.core.header_fields import (
    _chunk_b64,
    _chunk_q,
    _encoded_words,
    _fold,
    _q_char,
    address_header,
    assert_safe_header,
)
from postier.core.message import (
    MAX_LINE,
    InvalidMessageField,
    MessageIn,
    _date_header,
    _has_long_line,
    _mime_body,
    _single_text_part,
)
from postier.core.submitted_message import header_addresses

_LINE_BREAK = re.compile(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f\ud800-\udfff]")
_BODY_FORBIDDEN = re.compile(r"[\x00\ud800-\udfff]")


def _reference_safe(header: str) -> bool:
    lines = header[:-2].split("\r\n") if header.endswith("\r\n") else None
    return not (
        not lines
        or ":" not in lines[0]
        or lines[0][0] in " \t"
        or any(not (line[:1] in (" ", "\t") and line.strip()) for line in lines[1:])
        or any(_LINE_BREAK.search(line) or _CONTROL.search(line) for line in lines)
        or any(len(line.encode("utf-8")) > MAX_LINE for line in lines)
    )


def _ours_safe(header: str) -> bool:
    try:
        assert_safe_header(header)
    except ValueError:
        return False
    return True


# Every character class the check cares about: separators, spaces (ASCII and Unicode),
# line breaks, controls, surrogates, plain and wide text.
_HEADER_CHARS = st.sampled_from([
    *"ab:X- \t\r\n\x00\x01\x0b\x0c\x1c\x1f\x7f\x85\x9f\xa0\u2000\u2028\u2029\u3000é€😀",
    "\ud800", "\udfff", "\r\n", "\r\n ", "\r\n\t",
])
_HEADERS = st.one_of(
    st.lists(_HEADER_CHARS, max_size=40).map("".join),
    st.lists(_HEADER_CHARS, max_size=40).map(lambda cs: "X-A: " + "".join(cs) + "\r\n"),
    st.builds(lambda n, c, tail: "Subject: " + c * n + tail,
              st.integers(0, 1100), st.sampled_from(["a", "é", "€", " "]),
              st.sampled_from(["\r\n", "\r\n b\r\n", "", "\r\n \r\n"])),
)


@settings(max_examples=2000)
@given(_HEADERS)
def test_header_check_same_verdict_as_line_by_line(header: str) -> None:
    assert _ours_safe(header) == _reference_safe(header), repr(header)


@pytest.mark.parametrize("header", [
    "Subject: x\r\n", "S:\r\n", ":x\r\n", "Subject: x\r\n y\r\n", "Subject: x\r\n\ty z\r\n",
    "To: a@x.fr,\r\n b@x.fr\r\n", "S: a\r\n \xa0b\r\n",
])
def test_header_check_accepts(header: str) -> None:
    assert _ours_safe(header) and _reference_safe(header)


@pytest.mark.parametrize("header", [
    "", "Subject: x", "Subject: x\n", " S: x\r\n", "\tS: x\r\n", "S x\r\n", "S: x\r\ny: z\r\n",
    "S: x\r\n \r\n", "S: x\r\n \xa0\r\n", "S: x\r\n\r\n", "S: a\rb\r\n", "S: a\x85\r\n",
    "S: \ud800\r\n", "S: " + "a" * 996 + "\r\n", "S: " + "é" * 500 + "\r\n",
    "S: a\r\n " + "é" * 500 + "\r\n",
])
def test_header_check_refuses(header: str) -> None:
    assert not _ours_safe(header) and not _reference_safe(header)


_BODY_CHARS = st.sampled_from([*"ab \n\ré€😀\x01", "\x00", "\ud800", "\udfff"])


@settings(max_examples=1000)
@given(st.lists(_BODY_CHARS, max_size=60).map("".join))
def test_body_check_same_answer_as_the_expression(body: str) -> None:
    found = _BODY_FORBIDDEN.search(body)
    for field in ("text", "html"):
        try:
            MessageIn(to=["a@x.fr"], **{field: body})
        except ValidationError as exc:
            (error,) = exc.errors()
            assert found is not None
            cause = error["ctx"]["error"]
            assert isinstance(cause, InvalidMessageField)
            assert cause.params["char"] == f"U+{ord(found.group()):04X}"
        else:
            assert found is None


def _reference_single_text_part(text: str, subtype: str) -> bytes | None:
    lines = text.encode("utf-8").splitlines()
    if lines and max(map(len, lines)) > MAX_LINE:
        return None
    cte = "7bit" if text.isascii() else "8bit"
    head = (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    )
    return head.encode("ascii") + b"\r\n".join(lines) + b"\r\n"


# Lines around the 998-octet limit, in ASCII and in two-octet characters, with LF or CRLF
# or CR, with or without a final line break.
_LINES = st.builds(lambda n, c: c * n, st.integers(0, 1010), st.sampled_from(["a", "é", " "]))
_TEXTS = st.builds(
    lambda lines, sep, end: sep.join(lines) + end,
    st.lists(_LINES, max_size=4), st.sampled_from(["\n", "\r\n", "\r", "\n\n"]),
    st.sampled_from(["", "\n", "\r\n", "\r"]),
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_TEXTS, st.text(max_size=200)), st.sampled_from(["plain", "html"]))
def test_lf_text_path_same_bytes(text: str, subtype: str) -> None:
    fast = _single_text_part(text, subtype)
    assert fast == _reference_single_text_part(text, subtype)
    if fast is not None and "\x00" not in text:
        msg = MessageIn(to=["a@x.fr"], **{"text" if subtype == "plain" else "html": text})
        assert fast == _mime_body(msg, SMTP)


def _reference_encoded_words(text: str) -> list[str]:
    raw = text.encode("utf-8")
    q_parts = [_q_char(c) for c in text]
    q_length = sum(len(p) for p in q_parts)
    if q_length <= (len(raw) + 2) // 3 * 4:
        return _chunk_q(q_parts)
    return _chunk_b64(raw)


@settings(max_examples=1000)
@given(st.one_of(st.text(max_size=120), st.text("abé _=?", max_size=90)))
def test_encoded_words_same_as_char_by_char(text: str) -> None:
    assert _encoded_words(text) == _reference_encoded_words(text)


@pytest.mark.parametrize("date", [
    datetime(2025, 3, 14, 9, 26, 53, 123456, tzinfo=UTC),
    datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC),
    datetime(2025, 3, 14, 10, 26, 53, tzinfo=timezone(timedelta(hours=1))),
    datetime(2025, 3, 14, 9, 26, 53, tzinfo=timezone(timedelta(0))),
])
def test_date_header_as_format_datetime(date: datetime) -> None:
    # The same instant in another zone keeps its own offset (not a cached UTC one).
    _date_header(date.astimezone(UTC))
    assert _date_header(date) == f"Date: {format_datetime(date)}\r\n"


@pytest.mark.parametrize("address", ["a@x.fr", "parent.eleve1@example.org",
                                     "x" * 64 + "@" + "b" * 63 + ".fr", "élève@école.fr"])
def test_one_bare_address_as_the_folder_writes_it(address: str) -> None:
    assert address_header("To", [("", address)]) == _fold("To", [" " + address])


@settings(max_examples=1000)
@given(st.lists(st.integers(0, 2100), max_size=6), st.booleans())
def test_long_line_search_as_splitting(lengths: list[int], final_lf: bool) -> None:
    raw = b"\n".join(b"a" * n for n in lengths) + (b"\n" if final_lf else b"")
    assert _has_long_line(raw) == (max(map(len, raw.split(b"\n"))) > MAX_LINE)


@pytest.mark.parametrize("n", [997, 998, 999, 1000, 1997, 1998])
def test_long_line_at_the_edges(n: int) -> None:
    for raw in (b"a" * n, b"b\n" + b"a" * n, b"a" * n + b"\n", b"\n" * 3 + b"a" * n + b"\nb"):
        assert _has_long_line(raw) == (n > MAX_LINE), (n, raw[:4])


_NAME_PARTS = st.sampled_from(["Jean", "Dupont", "Vie scolaire", " ", '"', ",", ".", "(",
                               ")", ";", ":", "\\", "=?utf-8?q?=C3=A9?=", "é", "'", "<", ">"])
_LOCAL = st.sampled_from(["jean", "jean.dupont", "a..b", ".a", "a.", "x+y", "o'neil", "é",
                          '"quoted"', "a b", "a,b"])
_DOMAIN = st.sampled_from(["ac-lyon.fr", "example.org", "[127.0.0.1]", "a..b", "-x.fr",
                           "école.fr", "x"])


@settings(max_examples=400)
@given(st.lists(_NAME_PARTS, max_size=4).map("".join), _LOCAL, _DOMAIN,
       st.sampled_from(["{name} <{addr}>", "{addr}", "<{addr}>", "{name}<{addr}>",
                        " {addr} ", "{name} <{addr}>, other@example.org", "{name} {addr}"]))
def test_simple_mailboxes_read_as_the_email_package_reads_them(
    name: str, local: str, domain: str, form: str
) -> None:
    from email.utils import getaddresses

    value = form.format(name=name, addr=f"{local}@{domain}").strip()
    assert header_addresses([value]) == [a for _, a in getaddresses([value]) if a]
