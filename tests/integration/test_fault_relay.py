"""Self-tests of the FaultRelay test infrastructure, with ``smtplib`` as the client.

Every fault other tests rely on is proven here to do what it says.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from email.message import EmailMessage

import aiosmtplib
import pytest

from support import relay as fault_relay
from support.relay import FaultRelay

CLIENT_NAME = "client.test"  # avoid socket.getfqdn() (slow DNS) in smtplib


@contextlib.contextmanager
def smtp(
    relay: FaultRelay | int,
    *,
    timeout: float = 5,
    implicit_tls: ssl.SSLContext | None = None,
    host: str = "127.0.0.1",
) -> Iterator[smtplib.SMTP]:
    port = relay if isinstance(relay, int) else relay.port
    client: smtplib.SMTP
    if implicit_tls is not None:
        client = smtplib.SMTP_SSL(
            host, port, local_hostname=CLIENT_NAME, timeout=timeout, context=implicit_tls
        )
    else:
        client = smtplib.SMTP(host, port, local_hostname=CLIENT_NAME, timeout=timeout)
    try:
        yield client
    finally:
        client.close()


def raw_message(subject: str = "Bulletin", body: str = "Bonjour") -> bytes:
    return (
        f"From: ecole@lycee.fr\r\nTo: parent@x.fr\r\nSubject: {subject}\r\n\r\n{body}\r\n"
    ).encode()


# ------------------------------------------------------------------ recording


def test_records_message_exactly(relay: FaultRelay) -> None:
    data = (
        "From: école@lycée.fr\r\n"
        "To: parent@x.fr\r\n"
        "Subject: Réunion\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Élève absent.\r\n"
        ".leading dot survives dot-stuffing\r\n"
        "..two dots\r\n"
    ).encode()
    with smtp(relay) as client:
        client.ehlo()
        assert client.has_extn("smtputf8")
        assert client.has_extn("8bitmime")
        assert not client.has_extn("auth")  # no credentials configured
        refused = client.sendmail(
            "école@lycée.fr",
            ["parent@x.fr", "Prof@X.fr"],
            data,
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
        assert refused == {}
        client.sendmail("ecole@lycee.fr", ["b@x.fr"], raw_message("second"))

    [first, second] = relay.wait_for(2)
    assert first.mail_from == "école@lycée.fr"
    assert first.rcpt_tos == ["parent@x.fr", "Prof@X.fr"]
    assert first.data == data
    assert first.message["Subject"] == "Réunion"
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(first.mail_options)
    assert first.auth_user is None
    assert first.tls is False
    assert first.helo == CLIENT_NAME
    assert first.peer[0] == "127.0.0.1"
    assert abs(first.at - time.time()) < 5
    assert second.message["Subject"] == "second"
    assert relay.connections == 1

    relay.clear()
    assert relay.messages == []
    assert relay.connections == 0


def test_wait_for_reports_what_arrived(relay: FaultRelay) -> None:
    with smtp(relay) as client:
        client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message("only one"))
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"expected 2 message\(s\).*got 1") as excinfo:
        relay.wait_for(2, timeout=0.2)
    assert time.monotonic() - t0 < 2
    assert "only one" in str(excinfo.value)


async def test_usable_from_pytest_event_loop(relay: FaultRelay) -> None:
    msg = EmailMessage()
    msg["From"] = "ecole@lycee.fr"
    msg["To"] = "parent@x.fr"
    msg["Subject"] = "async"
    msg.set_content("Bonjour")
    await aiosmtplib.send(
        msg, hostname=relay.host, port=relay.port, local_hostname=CLIENT_NAME, timeout=5
    )
    [received] = await relay.wait_for_async(1, timeout=5)
    assert received.message["Subject"] == "async"


# ------------------------------------------------------------------ replies


def test_per_recipient_replies(relay: FaultRelay) -> None:
    relay.rcpt_replies["bad@x.fr"] = "550 5.1.1 No such user"
    relay.rcpt_replies["Later@X.fr"] = "451 4.3.0 Try later"  # keys are case-insensitive
    with smtp(relay) as client:
        refused = client.sendmail(
            "ecole@lycee.fr", ["ok@x.fr", "bad@x.fr", "later@x.fr"], raw_message()
        )
    assert refused == {
        "bad@x.fr": (550, b"5.1.1 No such user"),
        "later@x.fr": (451, b"4.3.0 Try later"),
    }
    [received] = relay.wait_for(1)
    assert received.rcpt_tos == ["ok@x.fr"]


def test_rcpt_reply_default(relay: FaultRelay) -> None:
    relay.rcpt_reply_default = "550 5.7.1 Relaying denied"
    relay.rcpt_replies["vip@x.fr"] = "250 2.1.5 Welcome"
    with smtp(relay) as client:
        client.ehlo()
        client.mail("ecole@lycee.fr")
        assert client.rcpt("a@x.fr") == (550, b"5.7.1 Relaying denied")
        assert client.rcpt("vip@x.fr") == (250, b"2.1.5 Welcome")
        client.rset()
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message())
    assert relay.messages == []


def test_mail_reply_and_refused_senders(relay: FaultRelay) -> None:
    relay.mail_reply = "550 5.7.1 Sender refused"
    with smtp(relay) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
            client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message())
        assert excinfo.value.smtp_code == 550
        assert excinfo.value.smtp_error == b"5.7.1 Sender refused"

        relay.mail_reply = None
        relay.refuse_senders = {"Spam@Lycee.fr"}
        with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
            client.sendmail("spam@lycee.fr", ["a@x.fr"], raw_message())
        assert excinfo.value.smtp_code == 553
        client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message())
    [received] = relay.wait_for(1)
    assert received.mail_from == "ecole@lycee.fr"


@pytest.mark.parametrize(
    ("reply", "code"),
    [("452 4.3.1 Insufficient storage", 452), ("554 5.6.0 rejected", 554)],
)
def test_data_reply_rejects_without_recording(relay: FaultRelay, reply: str, code: int) -> None:
    relay.data_reply = reply
    with smtp(relay) as client:
        with pytest.raises(smtplib.SMTPDataError) as excinfo:
            client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message())
        assert excinfo.value.smtp_code == code
        assert relay.messages == []

        relay.reset_faults()
        client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message())
    assert len(relay.wait_for(1)) == 1


def test_positive_data_reply_is_sent_and_recorded(relay: FaultRelay) -> None:
    relay.data_reply = "250 2.0.0 Ok: queued as ABC123"
    with smtp(relay) as client:
        client.ehlo()
        client.mail("ecole@lycee.fr")
        client.rcpt("a@x.fr")
        assert client.data(raw_message()) == (250, b"2.0.0 Ok: queued as ABC123")
    assert len(relay.wait_for(1)) == 1


def test_greeting_421(relay: FaultRelay) -> None:
    relay.greeting_reply = "421 4.3.2 Service not available"
    with pytest.raises(smtplib.SMTPConnectError) as excinfo:
        smtplib.SMTP(relay.host, relay.port, local_hostname=CLIENT_NAME, timeout=5)
    assert excinfo.value.smtp_code == 421
    assert excinfo.value.smtp_error == b"4.3.2 Service not available"
    assert relay.connections == 1


def test_reset_faults(relay: FaultRelay) -> None:
    relay.greeting_reply = "421 bye"
    relay.mail_reply = "550 no"
    relay.refuse_senders.add("x@y.fr")
    relay.rcpt_replies["a@x.fr"] = "550 no"
    relay.rcpt_reply_default = "550 no"
    relay.data_reply = "554 no"
    relay.stall = ("mail", 30)
    relay.drop_during_data = True
    relay.fail_tls_handshake = True
    relay.reset_faults()
    with smtp(relay) as client:
        assert client.sendmail("x@y.fr", ["a@x.fr"], raw_message()) == {}
    assert len(relay.wait_for(1)) == 1


def test_stall_rejects_unknown_step(relay: FaultRelay) -> None:
    with pytest.raises(ValueError, match="unknown stall step"):
        relay.stall = ("helo", 1)


# ------------------------------------------------------------------ stalls

CLIENT_TIMEOUT = 0.3
STALL = 30.0


def _converse_until(client: smtplib.SMTP, step: str) -> None:
    """Drive the SMTP dialogue; the step that stalls raises the client timeout."""
    if step == "connect":
        return  # smtplib reads the greeting while connecting
    client.ehlo()
    if step == "ehlo":
        return
    client.mail("ecole@lycee.fr")
    if step == "mail":
        return
    client.rcpt("a@x.fr")
    if step == "rcpt":
        return
    client.data(raw_message())


@pytest.mark.parametrize("step", ["connect", "ehlo", "mail", "rcpt", "data", "after_data"])
def test_stall_makes_client_time_out(relay: FaultRelay, step: str) -> None:
    relay.stall = (step, STALL)
    t0 = time.monotonic()
    with (
        pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"),
        smtp(relay, timeout=CLIENT_TIMEOUT) as client,
    ):
        _converse_until(client, step)
    elapsed = time.monotonic() - t0
    assert elapsed < CLIENT_TIMEOUT * 2 + 1, (
        f"client timeout did not fire within the stall: {elapsed}"
    )
    assert relay.messages == []


def test_short_stall_only_delays(relay: FaultRelay) -> None:
    relay.stall = ("after_data", 0.3)
    t0 = time.monotonic()
    with smtp(relay, timeout=5) as client:
        client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message())
    assert time.monotonic() - t0 >= 0.3
    assert len(relay.wait_for(1)) == 1


# ------------------------------------------------------------------ down / up


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_down_refuses_then_up_accepts_on_same_port(relay: FaultRelay) -> None:
    port = relay.port
    with smtp(relay) as client:
        client.ehlo()
        relay.down()  # established sessions are aborted too
        assert not relay.is_up
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()

    for _ in range(2):
        assert _refused(port)
        relay.up()
        assert relay.port == port
        with smtp(relay) as client:
            client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message())
        relay.down()
    relay.up()
    assert len(relay.wait_for(2)) == 2


# ------------------------------------------------------------------ TLS


def test_starttls_with_trusted_cert(tls_relay: FaultRelay) -> None:
    with smtp(tls_relay) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:  # STARTTLS is required
            client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message())
        assert excinfo.value.smtp_code == 530
    with smtp(tls_relay) as client:
        client.starttls(context=tls_relay.client_ssl_context())
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() is not None
        client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message())
    [received] = tls_relay.wait_for(1)
    assert received.tls is True


def test_starttls_cert_is_really_verified(tls_relay: FaultRelay) -> None:
    untrusting = ssl.create_default_context()  # system CAs only
    with smtp(tls_relay, host="localhost") as client, pytest.raises(ssl.SSLCertVerificationError):
        client.starttls(context=untrusting)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_implicit_tls_with_trusted_cert(implicit_tls_relay: FaultRelay, host: str) -> None:
    ctx = implicit_tls_relay.client_ssl_context()
    with smtp(implicit_tls_relay, implicit_tls=ctx, host=host) as client:
        client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message())
    [received] = implicit_tls_relay.wait_for(1)
    assert received.tls is True


def test_starttls_handshake_failure(tls_relay: FaultRelay) -> None:
    tls_relay.fail_tls_handshake = True
    with smtp(tls_relay) as client, pytest.raises(ssl.SSLError) as excinfo:
        client.starttls(context=tls_relay.client_ssl_context())
    # The relay aborts the handshake; the client sees EOF/alert, not a cert problem.
    assert not isinstance(excinfo.value, ssl.SSLCertVerificationError)
    tls_relay.fail_tls_handshake = False
    with smtp(tls_relay) as client:
        client.starttls(context=tls_relay.client_ssl_context())
        client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message())
    assert len(tls_relay.wait_for(1)) == 1


def test_implicit_tls_handshake_failure(implicit_tls_relay: FaultRelay) -> None:
    ctx = implicit_tls_relay.client_ssl_context()
    implicit_tls_relay.fail_tls_handshake = True
    with pytest.raises(ssl.SSLError) as excinfo:
        smtplib.SMTP_SSL(
            "127.0.0.1", implicit_tls_relay.port, local_hostname=CLIENT_NAME, timeout=5, context=ctx
        )
    assert not isinstance(excinfo.value, ssl.SSLCertVerificationError)
    implicit_tls_relay.fail_tls_handshake = False
    with smtp(implicit_tls_relay, implicit_tls=ctx) as client:
        assert client.noop()[0] == 250


# ------------------------------------------------------------------ AUTH


def test_auth_required(auth_relay: FaultRelay) -> None:
    with smtp(auth_relay) as client:
        client.ehlo()
        assert set(client.esmtp_features["auth"].split()) >= {"PLAIN", "LOGIN"}
        with pytest.raises(smtplib.SMTPSenderRefused) as excinfo:
            client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message())
        assert excinfo.value.smtp_code == 530
    assert auth_relay.messages == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_bad_password(auth_relay: FaultRelay, mechanism: str) -> None:
    with smtp(auth_relay) as client:
        client.ehlo()
        client.user, client.password = "teacher", "wrong"
        authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
            client.auth(mechanism, authobject)
        assert excinfo.value.smtp_code == 535


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_good_password(auth_relay: FaultRelay, mechanism: str) -> None:
    with smtp(auth_relay) as client:
        client.ehlo()
        client.user, client.password = "teacher", "s3cret"
        authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        assert client.auth(mechanism, authobject)[0] == 235
        client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message())
    [received] = auth_relay.wait_for(1)
    assert received.auth_user == "teacher"


# ------------------------------------------------------------------ connection faults


def test_drop_during_data(relay: FaultRelay) -> None:
    relay.drop_during_data = True
    big = raw_message(body="x" * 76 + "\r\n") * 20_000  # ~2 MB, still in flight when dropped
    with smtp(relay) as client, pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("ecole@lycee.fr", ["a@x.fr"], big)
    assert relay.messages == []
    relay.drop_during_data = False
    with smtp(relay) as client:
        client.sendmail("ecole@lycee.fr", ["a@x.fr"], raw_message())
    assert len(relay.wait_for(1)) == 1


def test_blackhole_times_out(blackhole: int) -> None:
    t0 = time.monotonic()
    with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
        smtplib.SMTP("127.0.0.1", blackhole, local_hostname=CLIENT_NAME, timeout=CLIENT_TIMEOUT)
    assert time.monotonic() - t0 < CLIENT_TIMEOUT + 1


def test_blackhole_port_is_released() -> None:
    with fault_relay.blackhole_port() as port:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert _refused(port)


def test_closed_port_refuses(closed_port: int) -> None:
    assert _refused(closed_port)
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP("127.0.0.1", closed_port, local_hostname=CLIENT_NAME, timeout=2)
    assert _refused(fault_relay.closed_port())


async def test_down_up_from_async_test(relay: FaultRelay) -> None:
    relay.down()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(relay.host, relay.port)
    relay.up()
    reader, writer = await asyncio.open_connection(relay.host, relay.port)
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220 ")
    writer.close()
    await writer.wait_closed()
