"""What an administrator reads when a relay fails: the failure table's words, and which
failure a real exception or reply of a relay conversation is."""

from __future__ import annotations

import socket
import ssl

import aiosmtplib
import pytest

from postier.core.settings import RelaySettings, Security
from postier.delivery.classify import FAILURES, classify, failure
from postier.errors import DeliveryError
from postier.i18n import translate

STEPS = ("resolve", "connect", "greeting", "ehlo", "tls", "auth", "mail_from", "rcpt_to",
         "data")


def _relay(port: int = 587, security: Security = Security.STARTTLS) -> RelaySettings:
    return RelaySettings(host="smtp.ac-lyon.fr", port=port, timeout=30, security=security)


# -- the table -------------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(FAILURES))
def test_every_failure_reads_in_french_and_english(code: str) -> None:
    words = FAILURES[code]
    assert words.code == code
    assert words.message and translate("fr", words.message) != words.message, (
        f"{code}: no French message")
    if words.hint is not None:
        assert translate("fr", words.hint) != words.hint, f"{code}: no French hint"


def test_only_final_answers_and_the_unforeseen_come_without_a_remedy() -> None:
    assert {c for c, w in FAILURES.items() if w.hint is None} == {"rejected", "unexpected"}


def test_only_permanent_failures_give_up_at_once() -> None:
    final = {c for c, w in FAILURES.items() if w.transient is False}
    by_reply = {c for c, w in FAILURES.items() if w.transient is None}
    assert final == {"rejected", "smtputf8_unsupported"}
    assert by_reply == {"sender_refused", "recipient_refused"}


def test_a_failure_without_parameters_is_worded_from_the_table() -> None:
    err = failure("not_configured", "resolve")
    assert err.code == "not_configured" and err.step == "resolve" and err.transient
    assert err.message("fr") == "Aucun serveur SMTP n'est paramétré."
    assert err.hint("en") == FAILURES["not_configured"].hint


# -- the network, TLS and time ---------------------------------------------------------------


def test_a_refused_connection_says_nothing_answers() -> None:
    err = classify(ConnectionRefusedError(111, "Connect call failed"), "connect", _relay())
    assert err.code == "refused" and err.transient
    assert err.message("en") == "Nothing answers at smtp.ac-lyon.fr:587 (connection refused)."
    assert err.hint("en") == "Check the port number and that the SMTP server is running."
    assert err.message("fr") == "Rien ne répond à smtp.ac-lyon.fr:587 (connexion refusée)."


def test_a_refusal_behind_another_error_is_still_a_refused_connection() -> None:
    exc = aiosmtplib.SMTPConnectError("Error connecting to smtp.ac-lyon.fr")
    exc.__cause__ = ConnectionRefusedError(111, "Connect call failed")
    assert classify(exc, "connect", _relay()).code == "refused"


def test_an_unknown_server_name() -> None:
    err = classify(socket.gaierror(-2, "Name or service not known"), "resolve", _relay())
    assert err.code == "dns" and err.transient
    assert err.message("en") == "The SMTP server name smtp.ac-lyon.fr cannot be found."


@pytest.mark.parametrize("step", STEPS)
def test_a_timeout_at_each_step_names_the_step_and_the_timeout(step: str) -> None:
    err = classify(aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"),
                   step, _relay())
    assert err.code == "timeout" and err.transient and err.step == step
    assert err.message("en") == (
        f"Timed out: smtp.ac-lyon.fr did not answer within 30 s (at step {step}).")
    assert err.hint("en") == ("Increase the server timeout (now 30 s), or check the host "
                              "and port.")


@pytest.mark.parametrize("step", ["connect", "greeting", "ehlo"])
def test_a_silent_port_465_without_tls_says_it_expects_implicit_tls(step: str) -> None:
    err = classify(TimeoutError(), step, _relay(465, Security.STARTTLS))
    assert err.code == "tls_expected"
    assert err.message("en") == ("Port 465 expects implicit TLS, but the security setting "
                                 "is starttls.")


def test_a_timeout_after_the_greeting_on_port_465_is_a_timeout() -> None:
    assert classify(TimeoutError(), "auth", _relay(465, Security.STARTTLS)).code == "timeout"
    assert classify(TimeoutError(), "greeting", _relay(465, Security.TLS)).code == "timeout"


def test_an_unverifiable_certificate_says_why() -> None:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "self-signed certificate"
    err = classify(exc, "tls", _relay())
    assert err.code == "tls_certificate" and err.transient
    assert err.message("en") == ("The TLS certificate of smtp.ac-lyon.fr cannot be verified: "
                                 "self-signed certificate.")


def test_implicit_tls_on_a_clear_text_port() -> None:
    exc = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    err = classify(exc, "tls", _relay(587, Security.TLS))
    assert err.code == "tls_unexpected"
    assert err.message("en") == "smtp.ac-lyon.fr:587 does not speak implicit TLS."
    # With STARTTLS, the same error is a failed handshake.
    assert classify(exc, "tls", _relay()).code == "tls_failed"


def test_a_connection_cut_during_the_handshake_is_a_failed_handshake() -> None:
    err = classify(ConnectionResetError(104, "Connection reset by peer"), "tls", _relay())
    assert err.code == "tls_failed"
    assert err.message("en") == ("The TLS handshake with smtp.ac-lyon.fr failed: "
                                 "[Errno 104] Connection reset by peer.")


def test_no_starttls_offered() -> None:
    err = classify(aiosmtplib.SMTPNotSupported("STARTTLS not advertised"), "tls", _relay())
    assert err.code == "starttls_unavailable"
    assert err.message("en") == "smtp.ac-lyon.fr:587 does not offer STARTTLS."


def test_a_connection_lost_later_is_a_disconnection() -> None:
    err = classify(aiosmtplib.SMTPServerDisconnected("Connection lost."), "data", _relay())
    assert err.code == "disconnected" and err.transient
    assert err.message("en") == ("The connection to smtp.ac-lyon.fr:587 was lost "
                                 "(Connection lost).")


# -- the relay's replies ---------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "step", "code", "transient"), [
    (aiosmtplib.SMTPAuthenticationError(535, "5.7.8 Bad credentials"), "auth",
     "auth_failed", True),
    (aiosmtplib.SMTPResponseException(530, "5.7.0 Must issue a STARTTLS command first"),
     "mail_from", "tls_required", True),
    (aiosmtplib.SMTPResponseException(530, "5.7.0 Authentication required"), "mail_from",
     "auth_required", True),
    (aiosmtplib.SMTPSenderRefused(451, "4.4.2 Message submission rate exceeded", "a@b.fr"),
     "mail_from", "rate_limited", True),
    (aiosmtplib.SMTPSenderRefused(553, "5.7.1 Sender not allowed", "a@b.fr"), "mail_from",
     "sender_refused", False),
    (aiosmtplib.SMTPSenderRefused(451, "4.3.0 Try again later", "a@b.fr"), "mail_from",
     "sender_refused", True),
    (aiosmtplib.SMTPRecipientRefused(550, "5.1.1 No such user", "x@y.fr"), "rcpt_to",
     "recipient_refused", False),
    (aiosmtplib.SMTPRecipientRefused(450, "4.2.1 Mailbox busy", "x@y.fr"), "rcpt_to",
     "recipient_refused", True),
    (aiosmtplib.SMTPDataError(452, "4.3.1 Insufficient storage"), "data", "smtp_error", True),
    (aiosmtplib.SMTPDataError(554, "5.6.0 Message rejected"), "data", "rejected", False),
])
def test_a_reply_maps_to_its_failure(exc: aiosmtplib.SMTPResponseException, step: str,
                                     code: str, transient: bool) -> None:
    err = classify(exc, step, _relay())
    assert (err.code, err.transient) == (code, transient)
    assert err.smtp_code == exc.code and err.reply == exc.message
    assert f"{exc.code} {exc.message}" in err.message("en"), "the relay's reply is shown"


def test_a_temporary_reply_promises_a_retry_and_a_final_one_does_not() -> None:
    later = classify(aiosmtplib.SMTPDataError(452, "4.3.1 Insufficient storage"), "data",
                     _relay())
    final = classify(aiosmtplib.SMTPDataError(554, "5.6.0 Message rejected"), "data",
                     _relay())
    assert later.hint("en") == "Postier will try again later."
    assert final.hint("en") is None
    assert final.message("fr") == ("Le serveur SMTP a répondu 554 5.6.0 Message rejected "
                                   "(étape data).")


def test_a_server_without_authentication() -> None:
    exc = aiosmtplib.SMTPException("No suitable authentication method found.")
    err = classify(exc, "auth", _relay())
    assert err.code == "auth_unsupported"
    assert err.message("en") == ("smtp.ac-lyon.fr:587 does not offer authentication (No "
                                 "suitable authentication method found).")


def test_anything_else_is_unexpected_and_retried() -> None:
    err = classify(ValueError("Command arg contains a prohibited control character"),
                   "mail_from", _relay())
    assert err.code == "unexpected" and err.transient and err.hint("en") is None


def test_an_explained_failure_stays_as_it_is() -> None:
    explained = DeliveryError("x", code="oauth2_refused", transient=True, step="auth")
    assert classify(explained, "data", _relay()) is explained
