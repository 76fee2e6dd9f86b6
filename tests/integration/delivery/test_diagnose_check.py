"""The connection check ("Vérifier la connexion") and the SMTP conversation of a test,
against real relays: over STARTTLS with AUTH LOGIN (the conversation goes on after TLS,
every AUTH payload masked), a refused password, and what the help desk reads.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.core.settings import RelaySettings
from postier.delivery import diagnose

from support.relay import FaultRelay

USER, PASSWORD = "college", "Mot-De-Passe-Secret-42"
SECRETS = (PASSWORD, base64.b64encode(PASSWORD.encode()).decode(),
           base64.b64encode(USER.encode()).decode())


@pytest.fixture
def starttls_auth_relay(relay_cert: tuple[Path, Path]) -> Iterator[FaultRelay]:
    """STARTTLS required, then AUTH PLAIN or LOGIN as college."""
    with FaultRelay(tls="starttls", auth={USER: PASSWORD}, cert=relay_cert) as relay:
        yield relay


def _relay(relay: FaultRelay, password: str = PASSWORD) -> RelaySettings:
    return RelaySettings(host=relay.host, port=relay.port, security="starttls",
                         auth="password", username=USER, password=password, timeout=5)


def _no_secret(lines: list[str]) -> None:
    text = "\n".join(lines)
    for secret in SECRETS:
        assert secret not in text, f"secret {secret!r} in the conversation:\n{text}"


async def test_check_over_starttls_stops_after_auth_and_masks_it(
    starttls_auth_relay: FaultRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTIER_CA_FILE", str(starttls_auth_relay.cert_path))
    report = await diagnose.test_send(
        _relay(starttls_auth_relay), to="parent@example.org", sender_name="École",
        sender_address="ecole@ac-lyon.fr", send=False)

    assert report.ok, report
    assert [s.step for s in report.steps] == [
        "resolve", "connect", "greeting", "ehlo", "tls", "auth", "quit"]
    assert report.sent is False and report.latency_ms is not None
    conversation = report.conversation
    # The conversation goes on after STARTTLS: the second EHLO, the AUTH and its reply.
    assert conversation.count("C: EHLO localhost") == 2, conversation
    assert "C: STARTTLS" in conversation
    assert any(line.startswith("C: AUTH ") and line.endswith("********")
               for line in conversation), conversation
    assert any(line.startswith("S: 235") for line in conversation), conversation
    assert conversation[-2:] == ["C: QUIT", conversation[-1]]
    assert conversation[-1].startswith("S: 221")
    assert not any("MAIL FROM" in line for line in conversation)
    _no_secret(conversation)
    assert starttls_auth_relay.messages == []


async def test_a_refused_password_is_shown_masked_and_stops_the_check(
    starttls_auth_relay: FaultRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTIER_CA_FILE", str(starttls_auth_relay.cert_path))
    wrong = "Pas-Le-Bon-Mot-De-Passe"
    report = await diagnose.test_send(
        _relay(starttls_auth_relay, wrong), to="parent@example.org", sender_name="École",
        sender_address="ecole@ac-lyon.fr", send=False, lang="fr")

    assert not report.ok and report.error is not None
    assert report.error["code"] == "auth_failed", report.error
    assert report.steps[-1].step == "auth" and not report.steps[-1].ok
    assert any(line.startswith("S: 535") for line in report.conversation), report.conversation
    text = "\n".join(report.conversation)
    assert wrong not in text and base64.b64encode(wrong.encode()).decode() not in text


def test_auth_login_payloads_and_the_message_are_masked() -> None:
    t = diagnose.Transcript()
    t.replied(220, "relay.ac-lyon.fr ESMTP")
    t.sent(b"AUTH LOGIN\r\n")
    t.replied(334, "VXNlcm5hbWU6")
    t.sent(base64.b64encode(USER.encode()) + b"\r\n")
    t.replied(334, "UGFzc3dvcmQ6")
    t.sent(base64.b64encode(PASSWORD.encode()) + b"\r\n")
    t.replied(235, "2.7.0 Authentication successful")
    t.sent(b"MAIL FROM:<ecole@ac-lyon.fr>\r\nRCPT TO:<parent@example.org>\r\nDATA\r\n")
    t.replied(250, "OK")
    t.replied(250, "OK")
    t.replied(354, "Go ahead")
    t.sent(b"Subject: test\r\n\r\n" + PASSWORD.encode() + b"\r\n.\r\n")
    t.replied(250, "Queued")
    t.sent(b"QUIT\r\n")

    assert t.lines == [
        "S: 220 relay.ac-lyon.fr ESMTP",
        "C: AUTH LOGIN",
        "S: 334 VXNlcm5hbWU6",
        "C: ********",
        "S: 334 UGFzc3dvcmQ6",
        "C: ********",
        "S: 235 2.7.0 Authentication successful",
        "C: MAIL FROM:<ecole@ac-lyon.fr>",
        "C: RCPT TO:<parent@example.org>",
        "C: DATA",
        "S: 250 OK",
        "S: 250 OK",
        "S: 354 Go ahead",
        f"C: [{len(PASSWORD) + 22} bytes: the test e-mail]",
        "S: 250 Queued",
        "C: QUIT",
    ]


def test_multiline_replies_keep_their_continuation_marks() -> None:
    t = diagnose.Transcript()
    t.replied(250, "relay.ac-lyon.fr\nPIPELINING\nAUTH PLAIN LOGIN")
    t.sent(b"AUTH PLAIN AGNvbGxlZ2UAc2VjcmV0\r\n")
    assert t.lines == ["S: 250-relay.ac-lyon.fr", "S: 250-PIPELINING",
                       "S: 250 AUTH PLAIN LOGIN", "C: AUTH PLAIN ********"]
