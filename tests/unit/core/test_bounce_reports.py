"""Reading bounces: real-world-shaped reports give the recipients, codes and Message-ID a
reader of the report would find; hostile input gives an answer, never an exception."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postier.core import bounce_reports
from postier.core.bounce_reports import (
    ACTIONS,
    MAX_RECIPIENTS,
    PATTERNS,
    PATTERNS_FILE,
    BouncedRecipient,
    BounceReport,
    load_patterns,
    parse_bounce,
)

CORPUS = Path(__file__).parents[2] / "data" / "bounces"
EXPECTED: dict[str, dict[str, Any]] = json.loads((CORPUS / "expected.json").read_text("utf-8"))
SAMPLES = {p.name: p.read_bytes() for p in sorted(CORPUS.glob("*.eml"))}
KINDS = {"dsn", "autoreply", "complaint", "unknown"}
FORMS = {"rfc3464", "arf", "autoreply", "unknown"} | {f.name for f in PATTERNS.forms}
STATUS = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})?")


def _summary(report: BounceReport) -> dict[str, Any]:
    return {
        "kind": report.kind, "form": report.form,
        "recipients": [{"address": r.address, "action": r.action, "status": r.status,
                        "code": r.code, "permanent": r.permanent, "diagnostic": r.diagnostic}
                       for r in report.recipients],
        "original_message_id": report.original_message_id,
        "addressed_to": list(report.addressed_to),
    }


def _differences(want: dict[str, Any], got: dict[str, Any]) -> list[str]:
    found = [f"{key}: expected {want[key]!r}, got {got[key]!r}"
             for key in want if key != "recipients" and want[key] != got[key]]
    wanted, gotten = want.get("recipients", []), got["recipients"]
    if len(wanted) != len(gotten):
        found.append(f"recipients: expected {[r['address'] for r in wanted]}, "
                     f"got {[r['address'] for r in gotten]}")
    for index, (w, g) in enumerate(zip(wanted, gotten, strict=False)):
        found += [f"recipient {index} ({w['address']}) {key}: expected {w[key]!r}, "
                  f"got {g[key]!r}" for key in w if w[key] != g[key]]
    return found


def _assert_well_formed(report: BounceReport) -> None:
    assert isinstance(report, BounceReport)
    assert report.kind in KINDS and report.form in FORMS, (report.kind, report.form)
    assert len(report.recipients) <= MAX_RECIPIENTS
    for recipient in report.recipients:
        assert recipient.action in ACTIONS, recipient
        assert STATUS.fullmatch(recipient.status), recipient
        assert recipient.code is None or 200 <= recipient.code <= 599, recipient
        assert len(recipient.diagnostic) <= 500 and "\n" not in recipient.diagnostic
    assert all(a == a.lower() for a in report.addressed_to)
    assert len(set(report.addressed_to)) == len(report.addressed_to)


# -- the corpus ------------------------------------------------------------------------------

def test_the_corpus_covers_what_readers_meet() -> None:
    assert set(SAMPLES) == set(EXPECTED), (
        f"samples without expectation: {sorted(set(SAMPLES) - set(EXPECTED))}; "
        f"expectations without sample: {sorted(set(EXPECTED) - set(SAMPLES))}")
    assert len(SAMPLES) >= 25
    forms = {e["form"] for e in EXPECTED.values()}
    missing = {"rfc3464", "arf", "exchange", "gmail", "postfix", "qmail", "exim", "generic",
               "autoreply", "unknown"} - forms
    assert not missing, f"no sample of the forms {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_sample_reads_as_expected(name: str) -> None:
    differences = _differences(EXPECTED[name], _summary(parse_bounce(SAMPLES[name])))
    assert not differences, f"{name}:\n  " + "\n  ".join(differences)


def test_a_delivery_report_wins_over_its_auto_reply_header() -> None:
    # Postfix and Exim mark their own bounces "Auto-Submitted: auto-replied".
    for name in ("postfix_dsn_user_unknown.eml", "exim_failed.eml"):
        assert b"Auto-Submitted: auto-replied" in SAMPLES[name]
        assert parse_bounce(SAMPLES[name]).kind == "dsn", name


def test_a_temporary_failure_is_not_permanent() -> None:
    report = parse_bounce(SAMPLES["postfix_dsn_two_recipients.eml"])
    states = {r.address: (r.action, r.permanent) for r in report.recipients}
    assert states == {"sophie.bernard@ac-lyon.example": ("failed", True),
                      "luc.moreau@lycee-rabelais.example": ("delayed", False)}


def test_the_message_id_and_the_addresses_the_report_was_sent_to_are_read() -> None:
    report = parse_bounce(
        b"To: Bounces <BOUNCES+AbC123@Ecole.Example>, other@ecole.example\r\n"
        b"Delivered-To: bounces+abc123@ecole.example\r\n"
        b"Delivered-To: relay@ecole.example\r\n"
        b"X-Original-To: bounces+abc123@ecole.example\r\n"
        b"Envelope-To: <envelope@ecole.example>\r\n"
        b"X-Envelope-To: x-envelope@ecole.example\r\n"
        b"From: MAILER-DAEMON@mx.example.org\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\n"
        b"X-Failed-Recipients: someone@example.org\r\n"
        b"Content-Type: text/plain\r\n\r\n"
        b"someone@example.org: 550 5.1.1 unknown user\r\n\r\n"
        b"--- Below this line is a copy of the message.\r\n\r\n"
        b"Message-ID: <42.postier@ecole.example>\r\n")
    assert report.addressed_to == ("bounces+abc123@ecole.example", "other@ecole.example",
                                   "relay@ecole.example", "envelope@ecole.example",
                                   "x-envelope@ecole.example")
    assert report.original_message_id == "<42.postier@ecole.example>"
    assert [(r.address, r.status, r.code) for r in report.recipients] == [
        ("someone@example.org", "5.1.1", 550)]


def test_a_french_raw_8bit_subject_is_read() -> None:
    # Sent without encoded words, as some French servers do: still an auto-reply.
    message = ("From: a@example.org\nTo: b@ecole.example\n"
               "Subject: Réponse automatique : absent\n\nJe suis absent.\n").encode()
    assert parse_bounce(message).kind == "autoreply"
    assert parse_bounce(message.decode().encode("cp1252")).kind == "autoreply"


def test_a_new_form_needs_only_an_entry_in_the_patterns(monkeypatch: pytest.MonkeyPatch) -> None:
    report = (b"From: robot@lotus.example\nTo: bounces+t0k3n@ecole.example\n"
              b"Subject: DELIVERY FAILURE: User pat.roy not listed\n\n"
              b"Your document was not delivered. Recipient: pat.roy@lotus.example\n"
              b"Reason: 550 5.1.1 no such person\n")
    assert parse_bounce(report).kind == "unknown"
    document = json.loads(PATTERNS_FILE.read_text(encoding="utf-8"))
    document["forms"].insert(0, {
        "form": "lotus",
        "recognise": [{"subject": "^DELIVERY FAILURE:"}],
        "recipients": [r"Recipient: (?P<address>{address})"],
        "diagnostic": [r"(?m)^Reason: (?P<diagnostic>[^\n]{1,1000})"],
    })
    monkeypatch.setattr(bounce_reports, "PATTERNS", load_patterns(document))
    read = parse_bounce(report)
    assert (read.kind, read.form) == ("dsn", "lotus")
    assert read.recipients == (BouncedRecipient("pat.roy@lotus.example", "failed", "5.1.1", 550,
                                                "550 5.1.1 no such person"),)


def test_a_basic_code_alone_gives_a_basic_status() -> None:
    report = parse_bounce(
        b"From: MAILER-DAEMON@mx.example.org\nSubject: failure notice\n\n"
        b"<x@example.org>: 550 mailbox unavailable\n<y@example.org>: 421 try later\n")
    assert [(r.address, r.action, r.status, r.code, r.permanent) for r in report.recipients] == [
        ("x@example.org", "failed", "5.0.0", 550, True),
        ("y@example.org", "delayed", "4.0.0", 421, False)]


@pytest.mark.parametrize("subject", ["Non remis : Sortie", "Échec de la remise du message",
                                     "Message non délivré", "Adresse introuvable"])
def test_a_french_subject_marks_a_report(subject: str) -> None:
    report = parse_bounce(
        f"From: Serveur <robot@mx.example.org>\nSubject: {subject}\n"
        "Content-Type: text/plain; charset=utf-8\n\n"
        "Votre message n'a pas pu être remis :\n\n"
        "eleve.martin@example.org : 550 5.1.1 Adresse inconnue\n".encode())
    assert (report.kind, report.form) == ("dsn", "generic"), subject
    assert [(r.address, r.status, r.permanent) for r in report.recipients] == [
        ("eleve.martin@example.org", "5.1.1", True)]



@pytest.mark.parametrize("signal", [
    "Auto-Submitted: auto-replied", "X-Autoreply: yes", "X-Autorespond: on",
    "Precedence: auto_reply", "Subject: Out of Office: back on Monday",
    "Subject: Automatic reply: Sortie", "Subject: =?utf-8?q?R=C3=A9ponse_automatique?=",
    "Subject: Absent du bureau", "Subject: Abwesenheitsnotiz: Austausch",
])
def test_an_auto_reply_is_told_from_a_personal_reply(signal: str) -> None:
    reply = "From: a@example.org\nTo: b@ecole.example\n{}\n\nBack on Monday.\n"
    assert parse_bounce(reply.format(signal).encode()).kind == "autoreply", signal
    assert parse_bounce(reply.format("Subject: Re: Sortie").encode()).kind == "unknown"

# -- hostile input ---------------------------------------------------------------------------

def _nested(depth: int) -> bytes:
    return (b"To: bounces+deep@ecole.example\n"
            + b"".join(b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i)
                       for i in range(depth)) + b"\nbody\n")


HOSTILE: dict[str, Callable[[], bytes]] = {
    "10,000 nested multiparts": lambda: _nested(10_000),
    "10,000 nested messages": lambda: b"Content-Type: message/rfc822\n\n" * 10_000,
    "5 MB of a": lambda: b"a" * 5_000_000,
    "a 1 MB header line": lambda: b"Subject: " + b"x" * 1_000_000 + b"\n\nbody",
    "a 1 MB Content-Type of parameters": lambda: (
        b"Content-Type: multipart/report; " + b'a";' * 300_000 + b"\n\nbody"),
    "a 10 MB folded Content-Type": lambda: b"Content-Type: text/plain;" + b"\n a;" * 2_500_000,
    "invalid base64": lambda: (b"Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\n"
                               + b"!!==*a" * 200_000),
    "NUL bytes": lambda: b"\0" * 1_000_000 + b"\nSubject: \0\n\n\0",
    "a multipart without boundary": lambda: (
        b"Content-Type: multipart/report; report-type=delivery-status\n\n--x\n\nhi\n--x--\n"),
    "10,000 parts": lambda: (b"Content-Type: multipart/mixed; boundary=x\n\n" + b"".join(
        b"--x\nContent-Type: message/delivery-status\n\n"
        b"Final-Recipient: rfc822; a%d@example.org\nAction: failed\n\n" % i
        for i in range(10_000)) + b"--x--\n"),
    "an unknown and a non-text charset": lambda: (
        b"Content-Type: multipart/mixed; boundary=x\n\n--x\nContent-Type: text/plain; "
        b"charset=x-klingon\n\n\xff\xfe\n--x\nContent-Type: text/plain; charset=zlib_codec\n\n"
        b"This is the qmail-send program\n--x--\n"),
    "an HTML part of unclosed tags": lambda: (
        b"Content-Type: text/html\n\n" + b"<style><pre><head>" * 50_000 + b"<" * 1_000_000),
    "a report line of 10 MB": lambda: (
        b"From: MAILER-DAEMON@x.example\nX-Failed-Recipients: a@b.example\n\n"
        b"This is the mail system at host x\n" + b"<a@" * 3_000_000),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_gets_an_answer(name: str) -> None:
    report = parse_bounce(HOSTILE[name]())
    _assert_well_formed(report)


def test_too_deep_a_nesting_still_says_where_the_report_went() -> None:
    report = parse_bounce(_nested(10_000))
    assert (report.kind, report.addressed_to) == ("unknown", ("bounces+deep@ecole.example",))


def test_many_parts_give_a_bounded_answer() -> None:
    report = parse_bounce(HOSTILE["10,000 parts"]())
    assert report.kind == "dsn" and 0 < len(report.recipients) <= MAX_RECIPIENTS


@pytest.mark.parametrize("line", [
    "a" * 60_000, "<" * 60_000, "@" * 60_000, " " * 60_000, "a@" * 30_000, "<a@" * 20_000,
    "a@b." * 15_000, "\n " * 30_000, "\n<a@b.example>:" * 5_000, "said: " * 10_000,
    "550 " * 15_000, "5.1.1 " * 10_000, "#550 " * 12_000, "'" * 60_000, "(" * 60_000,
    "Remote Server returned '" + "a" * 60_000, "Remote Server at " + "a " * 30_000,
    "\n  a@b.example" * 4_000, "a@b.example (" * 5_000, "after " + ":" * 60_000,
    "Message-ID: <" + "a" * 60_000, "=?utf-8?q?" * 6_000, "-" * 60_000, "é" * 60_000,
], ids=lambda line: repr(line[:12]))
def test_every_pattern_stays_linear_on_hostile_text(line: str) -> None:
    # A pattern that backtracks would hang here until the suite's timeout.
    text = bounce_reports._lines(line)
    patterns = [*PATTERNS.returned_copy, *PATTERNS.quoted_message_id, *PATTERNS.delayed,
                *PATTERNS.given_up, *PATTERNS.autoreply_subject,
                *(p for _, p in PATTERNS.autoreply_headers)]
    for form in PATTERNS.forms:
        patterns += [*(p for alt in form.recognise for _, p in alt), *form.recipients,
                     *form.diagnostic, *form.diagnostic_strip, *form.delayed]
    for pattern in patterns:
        for _ in zip(range(MAX_RECIPIENTS), pattern.finditer(text), strict=False):
            pass


# -- properties ------------------------------------------------------------------------------

def _mutated(sample: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    for where, length, insert in edits:
        at = where % (len(sample) + 1)
        sample = sample[:at] + insert + sample[at + length:]
    return sample


MUTATED = st.builds(
    _mutated, st.sampled_from(sorted(SAMPLES.values())),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 40),
                       st.binary(max_size=20) | st.sampled_from(
                           [b"\n", b"\r\n", b"--", b":", b";", b"<", b">", b"@", b"=?", b"\n\n",
                            b"Content-Type: multipart/mixed; boundary=x\n", b"\x00", b"\xff",
                            b"Content-Transfer-Encoding: base64\n"])),
             max_size=8))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_get_a_well_formed_answer(data: bytes) -> None:
    _assert_well_formed(parse_bounce(data))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MUTATED)
def test_a_damaged_sample_is_read_without_an_error(data: bytes) -> None:
    # parse_bounce answers whatever happens; the reading itself must not need that.
    message = bounce_reports._parse(data)
    addressed_to = bounce_reports._addressed_to(message)
    _assert_well_formed(bounce_reports._read(message, addressed_to, PATTERNS))

