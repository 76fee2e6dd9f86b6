"""SMTP submission with Python's smtplib as the client, against the real server and a real
relay: the doors a scanner, a script or a mail client would use."""

from __future__ import annotations

import smtplib
import socket
import sqlite3
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest

from support.relay import FaultRelay
from support.server import ServerProcess, free_port
from support.smtp_client import read_reply

MESSAGE = (
    "From: Bob Durand <bob.durand@gmail.com>\r\n"
    "To: parent@example.org\r\n"
    "Bcc: cachee@example.org\r\n"
    "Subject: Scan du bulletin\r\n"
    "X-Scanner: Copieur salle des profs\r\n"
    "\r\n"
    "Bulletin en piece jointe.\r\n.point en debut de ligne\r\n"
)


def tls_client(server: ServerProcess) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(server.data_dir / "smtp-cert.pem"))
    return ctx


@pytest.fixture
def smtp_server(server_factory: Any, relay: FaultRelay) -> Iterator[ServerProcess]:
    s: ServerProcess = server_factory(POSTIER_SQLITE_BUSY_TIMEOUT_MS="300")
    s.smtps_port = free_port()  # type: ignore[attr-defined]
    s.args = ["--smtps", f"127.0.0.1:{s.smtps_port}"]  # type: ignore[attr-defined]
    s.start()
    s.configure_relay(relay)
    yield s


def submit(server: ServerProcess, user: str, password: str, sender: str, rcpts: list[str],
           data: str | bytes = MESSAGE) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as c:
        c.starttls(context=tls_client(server))
        c.login(user, password)
        return c.sendmail(sender, rcpts, data)


def test_an_untrusting_client_and_a_sign_in_are_one_plain_log_line_each(
    smtp_server: ServerProcess, relay: FaultRelay
) -> None:
    """A copier that does not trust the self-signed certificate, then a successful AUTH:
    what an operator reads is one line each, no stack trace, no library warning."""
    with smtplib.SMTP("127.0.0.1", smtp_server.smtp_port, timeout=10) as c:
        c.ehlo()
        with pytest.raises(ssl.SSLCertVerificationError):
            c.starttls(context=ssl.create_default_context())
    assert submit(smtp_server, "alice", "motdepasse-alice", "alice.martin@ac-lyon.fr",
                  ["p@example.org"], "Subject: copie\r\n\r\nscan\r\n") == {}
    relay.wait_for(1)
    log = smtp_server.log()
    assert "AUTH alice from 127.0.0.1" in log
    assert "Traceback" not in log and "deprecated" not in log, log[-3000:]
    refused = [line for line in log.splitlines() if "STARTTLS refused by the client" in line]
    assert len(refused) == 1 and " INFO " in refused[0], refused


def test_starttls_auth_delivers_with_the_policy_applied(
    smtp_server: ServerProcess, relay: FaultRelay
) -> None:
    refused = submit(smtp_server, "bob", "motdepasse-bob", "bob.durand@gmail.com",
                     ["parent@example.org", "cachee@example.org"])
    assert refused == {}
    (got,) = relay.wait_for(1)
    # bob is outside the allowed domains: the establishment's sender, replies to bob.
    assert got.mail_from == "ne-pas-repondre@ac-lyon.fr"
    assert "ne-pas-repondre@ac-lyon.fr" in got.message["From"]
    assert got.message["Reply-To"] == "bob.durand@gmail.com"
    assert got.message["Bcc"] is None and b"cachee" not in got.data
    assert got.message["X-Scanner"] == "Copieur salle des profs"
    assert got.message["Message-ID"] and got.message["Date"]
    assert sorted(got.rcpt_tos) == ["cachee@example.org", "parent@example.org"]
    assert b"\r\n.point en debut" in got.data, "a dot-stuffed line arrives as written"


def test_implicit_tls_with_api_token_as_password(
    smtp_server: ServerProcess, relay: FaultRelay
) -> None:
    port = smtp_server.smtps_port  # type: ignore[attr-defined]
    with smtplib.SMTP_SSL("127.0.0.1", port, context=tls_client(smtp_server), timeout=10) as c:
        c.login("alice", smtp_server.tokens["alice"])
        c.sendmail("alice.martin@ac-lyon.fr", ["parent@example.org"],
                   MESSAGE.replace("Bob Durand <bob.durand@gmail.com>", "alice.martin@ac-lyon.fr"))
    (got,) = relay.wait_for(1)
    assert got.mail_from == "alice.martin@ac-lyon.fr"


def test_no_open_relay(smtp_server: ServerProcess, relay: FaultRelay) -> None:
    with smtplib.SMTP("127.0.0.1", smtp_server.smtp_port, timeout=10) as c:
        c.ehlo()
        assert not c.has_extn("auth"), "AUTH is offered only over TLS"
        code, msg = c.mail("bob.durand@gmail.com")
        assert code == 530 and b"Authentication required" in msg
        c.starttls(context=tls_client(smtp_server))
        c.ehlo()
        assert c.has_extn("auth")
        code, _ = c.mail("bob.durand@gmail.com")
        assert code == 530, "STARTTLS alone does not make a sender"
    time.sleep(0.3)
    assert relay.messages == []


def test_bad_password_refused_then_throttled(smtp_server: ServerProcess) -> None:
    # smtplib tries PLAIN then LOGIN: two failures per login, five allowed.
    for _ in range(2):
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            submit(smtp_server, "alice", "mauvais", "alice.martin@ac-lyon.fr", ["p@example.org"])
        assert info.value.smtp_code == 535
    with pytest.raises(smtplib.SMTPAuthenticationError):
        submit(smtp_server, "alice", "mauvais", "alice.martin@ac-lyon.fr", ["p@example.org"])
    # Now even the right password waits: the address and the username are held back.
    with pytest.raises(smtplib.SMTPAuthenticationError) as info:
        submit(smtp_server, "alice", "motdepasse-alice", "alice.martin@ac-lyon.fr",
               ["p@example.org"])
    assert info.value.smtp_code == 454 and b"Too many failed attempts" in info.value.smtp_error
    assert "AUTH failed for 'alice'" in smtp_server.log()


def test_sending_as_someone_else_is_refused(smtp_server: ServerProcess, relay: FaultRelay) -> None:
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        submit(smtp_server, "alice", "motdepasse-alice", "direction@ac-lyon.fr", ["p@example.org"])
    assert info.value.smtp_code == 553 and b"alice.martin@ac-lyon.fr" in info.value.smtp_error
    # The envelope is hers but the From header is not.
    with pytest.raises(smtplib.SMTPDataError) as data_info:
        submit(smtp_server, "alice", "motdepasse-alice", "alice.martin@ac-lyon.fr",
               ["p@example.org"], MESSAGE.replace("bob.durand@gmail.com", "direction@ac-lyon.fr"))
    assert data_info.value.smtp_code == 553
    time.sleep(0.3)
    assert relay.messages == []


def _raw_session(server: ServerProcess, payload: bytes) -> list[bytes]:
    """Speak SMTP byte for byte (smtplib would fix the line endings)."""
    import base64

    ctx = tls_client(server)
    port = server.smtps_port  # type: ignore[attr-defined]
    auth = base64.b64encode(b"\0alice\0motdepasse-alice").decode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        replies = [read_reply(s)]
        for line in (b"EHLO test\r\n", f"AUTH PLAIN {auth}\r\n".encode(),
                     b"MAIL FROM:<alice.martin@ac-lyon.fr>\r\n", b"RCPT TO:<p@example.org>\r\n",
                     b"DATA\r\n"):
            s.sendall(line)
            replies.append(read_reply(s))
        s.sendall(payload)
        replies.append(read_reply(s))
        s.sendall(b"QUIT\r\n")
        return replies


@pytest.mark.parametrize("smuggle", [
    b"Subject: a\r\n\r\nfirst\n.\nMAIL FROM:<direction@ac-lyon.fr>\r\n",
    b"Subject: a\r\n\r\nfirst\r\n.\nMAIL FROM:<direction@ac-lyon.fr>\r\n",
    b"Subject: a\r\n\r\nfirst\n.\r\nMAIL FROM:<direction@ac-lyon.fr>\r\n",
    b"Subject: a\r\n\r\nfirst\r.\rMAIL FROM:<direction@ac-lyon.fr>\r\n",
])
def test_smtp_smuggling_yields_no_second_message(
    smtp_server: ServerProcess, relay: FaultRelay, smuggle: bytes
) -> None:
    replies = _raw_session(smtp_server, smuggle + b"RCPT TO:<x@example.org>\r\nDATA\r\n"
                           b"Subject: smuggled\r\n\r\nevil\r\n.\r\n")
    final = replies[-1]
    assert b"550 5.6.0" in final, final
    time.sleep(0.5)
    assert all(m.message["Subject"] != "smuggled" for m in relay.messages)
    assert relay.messages == [], "the attempt is refused whole"


def test_recipient_and_size_limits(server_factory: Any, relay: FaultRelay) -> None:
    s: ServerProcess = server_factory(POSTIER_MAX_MESSAGE_SIZE="4096")
    s.start()
    s.configure_relay(relay)
    with smtplib.SMTP("127.0.0.1", s.smtp_port, timeout=10) as c:
        c.starttls(context=tls_client(s))
        c.login("alice", "motdepasse-alice")
        assert c.has_extn("size") and c.esmtp_features["size"] == "4096"
        c.mail("alice.martin@ac-lyon.fr")
        codes = [c.rcpt(f"p{i}@example.org")[0] for i in range(101)]
        assert codes[:100] == [250] * 100 and codes[100] == 452
        c.rset()
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            c.sendmail("alice.martin@ac-lyon.fr", ["p@example.org"], "Subject: big\r\n\r\n"
                       + "x" * 8000)
        assert info.value.smtp_code == 552


def test_store_failure_answers_451_and_stores_nothing(
    smtp_server: ServerProcess, relay: FaultRelay
) -> None:
    db = sqlite3.connect(smtp_server.data_dir / "postier.db", timeout=1)
    db.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(smtplib.SMTPDataError) as info:
            submit(smtp_server, "alice", "motdepasse-alice", "alice.martin@ac-lyon.fr",
                   ["p@example.org"], "Subject: verrou\r\n\r\ntexte\r\n")
        assert info.value.smtp_code == 451
    finally:
        db.rollback()
        db.close()
    with smtp_server.client() as c:
        assert c.get("/api/v1/messages").json() == []
    # Once the store is free again the same submission is accepted.
    assert submit(smtp_server, "alice", "motdepasse-alice", "alice.martin@ac-lyon.fr",
                  ["p@example.org"], "Subject: verrou\r\n\r\ntexte\r\n") == {}
    relay.wait_for(1)


def test_trusted_network_submits_for_its_application_account(
    server_factory: Any, relay: FaultRelay
) -> None:
    s: ServerProcess = server_factory()
    s.args = ["--smtp-trusted-networks", "127.0.0.0/8", "--smtp-trusted-account", "alice"]
    s.start()
    s.configure_relay(relay)
    with smtplib.SMTP("127.0.0.1", s.smtp_port, timeout=10) as c:
        assert c.sendmail("alice.martin@ac-lyon.fr", ["p@example.org"],
                          "Subject: scanner\r\n\r\nscan\r\n") == {}
        with pytest.raises(smtplib.SMTPSenderRefused):
            c.sendmail("direction@ac-lyon.fr", ["p@example.org"], "Subject: x\r\n\r\nx\r\n")
    (got,) = relay.wait_for(1)
    assert got.mail_from == "alice.martin@ac-lyon.fr"


def test_rate_limit_answers_try_later(server_factory: Any, relay: FaultRelay) -> None:
    s: ServerProcess = server_factory(POSTIER_SMTP_RATE_PER_MINUTE="3")
    s.start()
    s.configure_relay(relay)
    codes = []
    with smtplib.SMTP("127.0.0.1", s.smtp_port, timeout=10) as c:
        c.starttls(context=tls_client(s))
        c.login("alice", "motdepasse-alice")
        for _ in range(4):
            code, _ = c.mail("alice.martin@ac-lyon.fr")
            codes.append(code)
            c.rset()
    assert codes == [250, 250, 250, 451]


def test_data_framing_limits_and_pipelined_commands(
    server_factory: Any, relay: FaultRelay
) -> None:
    """The message is read in large pieces (not line by line): its end is found however
    the bytes are split, dots are un-stuffed, limits refuse it whole and leave the
    session in step, and commands pipelined after the final dot are not swallowed."""
    s: ServerProcess = server_factory(POSTIER_MAX_MESSAGE_SIZE="4096")
    s.args = ["--smtp-trusted-networks", "127.0.0.0/8", "--smtp-trusted-account", "alice"]
    s.start()
    s.configure_relay(relay)
    envelope = b"MAIL FROM:<alice.martin@ac-lyon.fr>\r\nRCPT TO:<p@example.org>\r\nDATA\r\n"

    def send(sock: socket.socket, data: bytes, replies: int) -> list[bytes]:
        """Write ``data``; the last lines of the next ``replies`` replies."""
        sock.sendall(data)
        buf = b""
        while True:
            finals = [line for line in buf.split(b"\r\n")[:-1] if line[3:4] == b" "]
            if len(finals) >= replies:
                return finals
            chunk = sock.recv(65536)
            if not chunk:
                return finals
            buf += chunk

    with socket.create_connection(("127.0.0.1", s.smtp_port), timeout=10) as sock:
        assert read_reply(sock).startswith(b"220")
        assert send(sock, b"EHLO test\r\n", 1)[0].startswith(b"250")
        assert [r[:3] for r in send(sock, envelope, 3)] == [b"250", b"250", b"354"]
        # Dot-stuffed lines, and the end split across writes in awkward places.
        body = (b"Subject: points\r\n\r\n..deux points\r\n..\r\nfin.\r\n")
        for part in (body[:5], body[5:23], body[23:], b"\r", b"\n.", b"\r", b"\n"):
            sock.sendall(part)
            time.sleep(0.02)
        first = read_reply(sock)
        assert first.startswith(b"250 "), first
        # Too big, with no SIZE announced: refused once all of it is read.
        assert [r[:3] for r in send(sock, envelope, 3)] == [b"250", b"250", b"354"]
        big = b"Subject: gros\r\n\r\n" + (b"x" * 70 + b"\r\n") * 100 + b".\r\n"
        assert send(sock, big, 1)[0].startswith(b"552")
        # A line longer than SMTP allows (1,000 characters).
        assert [r[:3] for r in send(sock, envelope, 3)] == [b"250", b"250", b"354"]
        long = b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n"
        assert send(sock, long, 1)[0].startswith(b"500")
        # The session is still in step: a message, then a command pipelined after its
        # final dot in the same write.
        assert [r[:3] for r in send(sock, envelope, 3)] == [b"250", b"250", b"354"]
        replies = send(sock, b"Subject: encore\r\n\r\nok\r\n.\r\nNOOP\r\n", 2)
        assert replies[0].startswith(b"250 2.0.0 OK queued"), replies
        assert replies[1].startswith(b"250"), replies
        sock.sendall(b"QUIT\r\n")
    got = relay.wait_for(2)
    by_subject = {m.message["Subject"]: m for m in got}
    assert set(by_subject) == {"points", "encore"}
    assert b"\r\n.deux points\r\n.\r\nfin.\r\n" in by_subject["points"].data
