"""The test-send ("Tester l'envoi d'e-mails") against real relays (support.relay.FaultRelay).

Each test runs :func:`postier.delivery.diagnose.test_send` against a relay set up to succeed or to
fail in one way, and checks what the user would see: the steps, the error code, and the
message and remedy in French or English.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import postier.i18n
from postier.core.settings import RelaySettings
from postier.delivery import diagnose
from postier.delivery.diagnose import TestReport

from support.relay import FaultRelay

LOCALE = Path(postier.i18n.__file__).parent / "locale" / "fr" / "LC_MESSAGES"
TO = "parent@example.org"
SENDER = "ecole@ac-lyon.fr"
SENDER_NAME = "Lycée Jean Moulin"
OK_STEPS = ["mail_from", "rcpt_to", "data"]


def settings(port: int, **kw: Any) -> RelaySettings:
    kw.setdefault("host", "127.0.0.1")
    kw.setdefault("security", "none")
    kw.setdefault("timeout", 5)
    return RelaySettings(port=port, **kw)


async def run(relay: RelaySettings, **kw: Any) -> TestReport:
    kw.setdefault("to", TO)
    kw.setdefault("sender_name", SENDER_NAME)
    kw.setdefault("sender_address", SENDER)
    return await diagnose.test_send(relay, **kw)


def names(report: TestReport) -> list[str]:
    return [s.step for s in report.steps]


def failed(report: TestReport, code: str, step: str) -> dict[str, Any]:
    """Check the report stops at ``step`` with ``code``; return the error."""
    assert not report.ok, report
    assert report.error is not None
    assert report.error["code"] == code, report
    last = report.steps[-1]
    assert (last.step, last.ok) == (step, False), report.steps
    assert all(s.ok for s in report.steps[:-1]), report.steps
    assert report.latency_ms is None and report.suggestion is None
    return report.error


# -- success -------------------------------------------------------------------------------


async def test_plain_relay_receives_the_test_email_in_french(relay: FaultRelay) -> None:
    report = await run(settings(relay.port), lang="fr", label="Profil académie de Lyon")

    assert report.ok, report
    assert names(report) == ["resolve", "connect", "greeting", "ehlo", *OK_STEPS]
    assert all(s.ok and isinstance(s.ms, int) and s.ms >= 0 for s in report.steps)
    detail = {s.step: s.detail for s in report.steps}
    assert detail["greeting"].startswith("220 ")
    assert detail["data"] == "250 2.0.0 OK queued"
    assert report.latency_ms is not None
    assert report.latency_ms >= max(s.ms for s in report.steps)
    assert report.error is None and report.suggestion is None

    [got] = await relay.wait_for_async(1)
    assert got.mail_from == SENDER and got.rcpt_tos == [TO]
    msg = got.message
    assert msg["Subject"] == "Test d'envoi d'e-mails Postier"
    assert msg["From"].addresses[0].display_name == SENDER_NAME
    assert msg["From"].addresses[0].addr_spec == SENDER
    body = msg.get_content()
    assert "Serveur SMTP : 127.0.0.1" in body
    assert f"Port : {relay.port}" in body
    assert "Sécurité : aucune" in body
    assert "Profil académie de Lyon" in body


async def test_report_has_the_api_shape(relay: FaultRelay) -> None:
    doc = (await run(settings(relay.port), check_senders=[SENDER])).as_dict()

    assert set(doc) == {"ok", "steps", "error", "latency_ms", "suggestion", "sender_checks",
                        "dkim", "sent", "unsaved", "unsaved_message", "conversation"}
    assert all(set(s) == {"step", "ok", "ms", "detail"} for s in doc["steps"])
    assert doc["ok"] is True and doc["error"] is None
    assert doc["sender_checks"] == [
        {"address": SENDER, "ok": True, "code": 250, "reply": "2.1.0 OK"}
    ]


async def test_starttls_with_trusted_certificate(
    tls_relay: FaultRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTIER_CA_FILE", str(tls_relay.cert_path))
    report = await run(settings(tls_relay.port, security="starttls"))

    assert report.ok, report
    assert names(report) == ["resolve", "connect", "greeting", "ehlo", "tls", *OK_STEPS]
    assert report.steps[4].detail.startswith("220 ")
    [got] = await tls_relay.wait_for_async(1)
    assert got.tls


async def test_starttls_with_untrusted_certificate(
    tls_relay: FaultRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POSTIER_CA_FILE", raising=False)
    report = await run(settings(tls_relay.port, security="starttls"), lang="fr")

    error = failed(report, "tls_certificate", "tls")
    assert error["message"].startswith("Le certificat TLS de 127.0.0.1 ne peut pas être vérifié")
    assert "il doit correspondre au certificat" in error["hint"]
    assert tls_relay.messages == []


async def test_implicit_tls(
    implicit_tls_relay: FaultRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTIER_CA_FILE", str(implicit_tls_relay.cert_path))
    report = await run(settings(implicit_tls_relay.port, security="tls"))

    assert report.ok, report
    assert names(report) == ["resolve", "connect", "tls", "ehlo", *OK_STEPS]
    assert report.steps[2].detail.startswith("220 ")  # implicit TLS includes the greeting
    await implicit_tls_relay.wait_for_async(1)


async def test_starttls_on_implicit_tls_port_is_found_by_probing(
    implicit_tls_relay: FaultRelay,
) -> None:
    # Not port 465, so nothing to guess from: the TLS probe tells.
    start = time.monotonic()
    report = await run(settings(implicit_tls_relay.port, security="starttls", timeout=1))
    elapsed = time.monotonic() - start

    error = failed(report, "tls_expected", "greeting")
    assert error["message"] == (
        f"127.0.0.1:{implicit_tls_relay.port} expects implicit TLS (a TLS handshake on this "
        "port succeeded), but the security setting is STARTTLS."
    )
    assert error["hint"].startswith("This port expects implicit TLS: choose TLS security")
    assert "TLS handshake" in report.steps[-1].detail
    assert elapsed < 2.5, elapsed

    fr = await run(settings(implicit_tls_relay.port, security="none", timeout=1), lang="fr")
    error = failed(fr, "tls_expected", "greeting")
    assert "attend du TLS implicite" in error["message"] and "« aucune »" in error["message"]
    assert error["hint"].startswith("Ce port attend du TLS implicite : choisissez la sécurité TLS")


async def test_implicit_tls_on_plain_port(relay: FaultRelay) -> None:
    report = await run(settings(relay.port, security="tls"))

    error = failed(report, "tls_unexpected", "tls")
    assert error["message"] == f"127.0.0.1:{relay.port} does not speak implicit TLS."


async def test_starttls_not_offered(relay: FaultRelay) -> None:
    report = await run(settings(relay.port, security="starttls"), lang="fr")

    error = failed(report, "starttls_unavailable", "tls")
    assert error["message"] == f"127.0.0.1:{relay.port} ne propose pas STARTTLS."
    assert relay.messages == []  # never fell back to clear text


# -- authentication --------------------------------------------------------------------------


async def test_authentication_success_body_never_shows_the_password(
    auth_relay: FaultRelay,
) -> None:
    relay = settings(auth_relay.port, auth="password", username="teacher", password="s3cret")
    report = await run(relay, lang="en")

    assert report.ok, report
    assert names(report) == ["resolve", "connect", "greeting", "ehlo", "auth", *OK_STEPS]
    assert report.steps[4].detail.startswith("235 ")
    [got] = await auth_relay.wait_for_async(1)
    assert got.auth_user == "teacher"
    assert got.message["Subject"] == "Postier test e-mail"
    body = got.message.get_content()
    assert "Username: teacher" in body and "Authentication: password" in body
    assert "s3cret" not in got.data.decode("ascii", "replace")


async def test_wrong_password(auth_relay: FaultRelay) -> None:
    relay = settings(auth_relay.port, auth="password", username="teacher", password="wrong")
    en = await run(relay)
    fr = await run(relay, lang="fr")

    error = failed(en, "auth_failed", "auth")
    assert error["message"].startswith("The SMTP server refused the username or password (535")
    error = failed(fr, "auth_failed", "auth")
    assert error["message"].startswith("Le serveur SMTP a refusé l'identifiant ou le mot de passe")
    assert auth_relay.messages == []


async def test_authentication_not_configured(auth_relay: FaultRelay) -> None:
    report = await run(settings(auth_relay.port))

    error = failed(report, "auth_required", "mail_from")
    assert error["message"].startswith("The SMTP server requires authentication (530")
    assert error["hint"].startswith("Choose password authentication")


# -- refusals --------------------------------------------------------------------------------


async def test_sender_refused(relay: FaultRelay) -> None:
    relay.mail_reply = "550 5.7.1 Sender not allowed"
    en = await run(settings(relay.port))
    fr = await run(settings(relay.port), lang="fr")

    error = failed(en, "sender_refused", "mail_from")
    assert error["message"] == (
        "The SMTP server refuses the sender address (550 5.7.1 Sender not allowed)."
    )
    assert "allowed domains" in error["hint"] and "sender address" in error["hint"]
    assert en.steps[-1].detail == "5.7.1 Sender not allowed"
    error = failed(fr, "sender_refused", "mail_from")
    assert "domaines autorisés" in error["hint"] and "adresse d'expédition" in error["hint"]
    assert relay.messages == []


async def test_recipient_refused(relay: FaultRelay) -> None:
    relay.rcpt_replies[TO] = "550 5.1.1 No such user"
    report = await run(settings(relay.port), lang="fr")

    error = failed(report, "recipient_refused", "rcpt_to")
    assert error["message"] == "Le serveur SMTP refuse le destinataire (550 5.1.1 No such user)."
    assert error["hint"] == "Vérifiez l'adresse du destinataire."
    assert relay.messages == []


async def test_message_refused_at_data(relay: FaultRelay) -> None:
    relay.data_reply = "554 5.7.1 Message rejected as spam"
    report = await run(settings(relay.port))

    error = failed(report, "rejected", "data")
    assert "554 5.7.1 Message rejected as spam" in error["message"]


async def test_rate_limited(relay: FaultRelay) -> None:
    relay.mail_reply = "451 4.7.0 Rate limit exceeded"
    report = await run(settings(relay.port))

    error = failed(report, "rate_limited", "mail_from")
    assert error["message"] == "The SMTP server asks to slow down (451 4.7.0 Rate limit exceeded)."


async def test_service_not_available_greeting(relay: FaultRelay) -> None:
    relay.greeting_reply = "421 4.3.2 Service not available"
    start = time.monotonic()
    report = await run(settings(relay.port, timeout=2), lang="en")

    assert time.monotonic() - start < 1.5  # answered at once: no waiting, no TLS verdict
    assert not report.ok and report.error is not None
    assert report.error["code"] not in ("timeout", "tls_expected")
    assert (report.steps[-1].step, report.steps[-1].ok) == ("greeting", False)
    assert "4.3.2 Service not available" in report.steps[-1].detail
    assert "4.3.2 Service not available" in report.error["message"]


async def test_service_not_available_greeting_keeps_the_smtp_code(relay: FaultRelay) -> None:
    relay.greeting_reply = "421 4.3.2 Service not available"
    report = await run(settings(relay.port, timeout=2))

    error = failed(report, "smtp_error", "greeting")
    assert error["message"] == (
        "The SMTP server answered 421 4.3.2 Service not available (at step server greeting)."
    )


async def test_relay_requiring_starttls_with_security_none(tls_relay: FaultRelay) -> None:
    report = await run(settings(tls_relay.port, security="none"))

    assert not report.ok and report.error is not None
    assert report.error["code"] != "auth_required"
    assert "STARTTLS" in (report.error["hint"] or "")


# -- unreachable -----------------------------------------------------------------------------


async def test_blackhole_times_out_with_the_french_remedy(blackhole: int) -> None:
    start = time.monotonic()
    report = await run(settings(blackhole, timeout=2), lang="fr")
    elapsed = time.monotonic() - start

    error = failed(report, "timeout", "greeting")
    assert 2 <= elapsed < 3, elapsed
    assert error["message"] == (
        "Délai dépassé : 127.0.0.1 n'a pas répondu en 2 s (étape accueil du serveur)."
    )
    assert error["hint"] == (
        "Augmentez le délai d'attente du serveur (actuellement 2 s), ou vérifiez l'adresse et "
        "le port."
    )


async def test_blackhole_times_out_in_english(blackhole: int) -> None:
    start = time.monotonic()
    report = await run(settings(blackhole, timeout=1, security="starttls"))

    assert time.monotonic() - start < 2
    error = failed(report, "timeout", "greeting")
    assert error["message"] == (
        "Timed out: 127.0.0.1 did not answer within 1 s (at step server greeting)."
    )
    assert error["hint"] == (
        "Increase the server timeout (now 1 s), or check the host and port."
    )


async def test_closed_port(closed_port: int) -> None:
    en = await run(settings(closed_port))
    fr = await run(settings(closed_port), lang="fr")

    error = failed(en, "refused", "connect")
    assert error["message"] == f"Nothing answers at 127.0.0.1:{closed_port} (connection refused)."
    error = failed(fr, "refused", "connect")
    assert error["message"] == f"Rien ne répond à 127.0.0.1:{closed_port} (connexion refusée)."
    assert error["hint"] == "Vérifiez le numéro de port et que le serveur SMTP est en service."


async def test_unknown_host() -> None:
    report = await run(settings(25, host="nonexistent.invalid"), lang="fr")

    error = failed(report, "dns", "resolve")
    assert error["message"] == "Le nom du serveur SMTP nonexistent.invalid est introuvable."


async def test_no_server_configured() -> None:
    report = await run(settings(587, host=""))

    error = failed(report, "not_configured", "resolve")
    assert error["message"] == "No SMTP server is configured."


# -- time ------------------------------------------------------------------------------------


async def test_suggests_a_longer_timeout_when_a_step_is_slow(relay: FaultRelay) -> None:
    relay.stall = ("ehlo", 0.6)
    report = await run(settings(relay.port, timeout=1), lang="fr")

    assert report.ok, report
    assert report.suggestion is not None
    assert report.suggestion.startswith("L'étape la plus lente (EHLO) a pris 0,6 s")
    assert "réglez le délai d'attente du serveur à 2 s" in report.suggestion


async def test_whole_test_is_bounded_by_three_timeouts() -> None:
    """A server that answers every command just within the timeout still cannot keep the
    user waiting more than 3 × timeout."""

    async def slow_smtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.sleep(0.8)
            writer.write(b"220 slow.example ESMTP\r\n")
            while line := await reader.readline():
                await asyncio.sleep(0.8)
                verb = line[:4].upper()
                writer.write(b"250 slow.example\r\n" if verb == b"EHLO" else b"250 OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client hung up, or the test is over
        finally:
            writer.close()

    server = await asyncio.start_server(slow_smtp, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        start = time.monotonic()
        report = await run(settings(port, timeout=1), lang="fr")
        elapsed = time.monotonic() - start
    finally:
        server.close()

    assert 3 <= elapsed < 3.5, elapsed
    # greeting, EHLO and MAIL FROM took 0.8 s each: RCPT TO was cut at 3 s.
    error = failed(report, "timeout", "rcpt_to")
    assert error["message"].startswith("Délai dépassé : le test n'a pas abouti en 3 s")
    assert error["hint"].startswith("Augmentez le délai d'attente du serveur (actuellement 1 s)")


# -- sender checks ---------------------------------------------------------------------------


async def test_sender_checks_list_refused_senders_without_sending(relay: FaultRelay) -> None:
    relay.refuse_senders = {"vie-scolaire@lycee-moulin.fr"}
    report = await run(
        settings(relay.port),
        check_senders=[SENDER, "vie-scolaire@lycee-moulin.fr", "direction@ac-lyon.fr"],
    )

    assert report.ok  # the caller decides what a refused sender means
    assert report.sender_checks == [
        {"address": SENDER, "ok": True, "code": 250, "reply": "2.1.0 OK"},
        {"address": "vie-scolaire@lycee-moulin.fr", "ok": False, "code": 553,
         "reply": "5.7.1 Sender address rejected"},
        {"address": "direction@ac-lyon.fr", "ok": True, "code": 250, "reply": "2.1.0 OK"},
    ]
    assert len(relay.messages) == 1  # only the test e-mail itself: checks send nothing


async def test_sender_checks_still_run_when_the_test_sender_is_refused(
    relay: FaultRelay,
) -> None:
    relay.refuse_senders = {SENDER}
    report = await run(settings(relay.port), check_senders=[SENDER, "prof@ac-lyon.fr"])

    failed(report, "sender_refused", "mail_from")
    assert [(c["address"], c["ok"], c["code"]) for c in report.sender_checks] == [
        (SENDER, False, 553), ("prof@ac-lyon.fr", True, 250),
    ]


async def test_sender_checks_not_checked_when_the_relay_is_unreachable(closed_port: int) -> None:
    report = await run(settings(closed_port), lang="fr", check_senders=[SENDER])

    failed(report, "refused", "connect")
    [check] = report.sender_checks
    assert check["ok"] is False and check["code"] is None
    assert check["reply"].startswith("Non vérifiée : Rien ne répond à 127.0.0.1")
