"""Reading bounces from an IMAP mailbox, against a real Dovecot (``support.dovecot``).

Each test gets a private Dovecot with an empty mailbox, puts messages in it as a mail
server would (unread), and checks what a person would see: which messages were handed
over, which are marked as read on the server, and how a failure is worded in French and
English.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient

from postier.core.settings import Security
from postier.ops.bounce_mailbox import (
    MailboxError,
    MailboxRead,
    check_mailbox,
    poll_mailbox,
    read_mailbox,
)

from support.dovecot import ACCENTED_PASSWORD, ACCENTED_USERNAME, Dovecot


def bounce(n: int, body: bytes = b"") -> bytes:
    return (f"From: MAILER-DAEMON@relay.example\r\nTo: bounces+t{n}@school.example\r\n"
            f"Subject: Undelivered Mail Returned to Sender {n}\r\n"
            f"Message-ID: <bounce-{n}@relay.example>\r\n\r\n"
            f"This is bounce number {n}.\r\n").encode() + body


@pytest.fixture
def trusted(monkeypatch: pytest.MonkeyPatch, dovecot: Dovecot) -> Path:
    """Postier trusts the test server's certificate, as an administrator sets
    POSTIER_CA_FILE for an internal authority."""
    monkeypatch.setenv("POSTIER_CA_FILE", str(dovecot.cert_path))
    return dovecot.cert_path


@pytest.fixture
def untrusted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POSTIER_CA_FILE", raising=False)


@pytest.mark.parametrize("security", [Security.TLS, Security.STARTTLS, Security.NONE])
def test_messages_are_handed_over_once_and_marked_read(
        dovecot: Dovecot, trusted: Path, security: Security) -> None:
    messages = [bounce(1), bounce(2), bounce(3)]
    for raw in messages:
        dovecot.deliver(raw)
    got: list[bytes] = []

    result = read_mailbox(dovecot.mailbox(security), got.append)

    assert result == MailboxRead(read=3, skipped=0, left=0)
    assert got == messages, "each message handed over whole, exactly, oldest first"
    assert dovecot.unseen() == 0, "every message handed over is marked as read"
    assert dovecot.count() == 3, "nothing is deleted: a person can still read the bounces"
    again: list[bytes] = []
    assert read_mailbox(dovecot.mailbox(security), again.append) == MailboxRead(0, 0, 0)
    assert again == [], "a message already read is not handed over again"


def test_only_new_messages_are_read_at_the_next_look(dovecot: Dovecot) -> None:
    dovecot.deliver(bounce(1))
    read_mailbox(dovecot.mailbox(Security.NONE), lambda raw: None)
    dovecot.deliver(bounce(2))
    got: list[bytes] = []

    assert read_mailbox(dovecot.mailbox(Security.NONE), got.append).read == 1
    assert got == [bounce(2)]


@pytest.mark.parametrize("security", [Security.TLS, Security.STARTTLS])
def test_an_untrusted_certificate_is_refused_in_both_languages(
        dovecot: Dovecot, untrusted: None, security: Security) -> None:
    dovecot.deliver(bounce(1))
    handed: list[bytes] = []

    with pytest.raises(MailboxError) as caught:
        read_mailbox(dovecot.mailbox(security), handed.append)

    err = caught.value
    assert err.code == "bounce_mailbox"
    assert err.failure == "tls_certificate"
    assert "is not trusted" in err.message("en") and "self-signed" in err.message("en")
    assert "n'est pas reconnu comme fiable" in err.message("fr")
    assert "POSTIER_CA_FILE" in (err.hint("en") or "")
    assert "autorité interne" in (err.hint("fr") or "")
    assert err.transient
    assert handed == [] and dovecot.unseen() == 1, "nothing read through a doubtful server"


def test_the_certificate_check_can_be_turned_off(dovecot: Dovecot, untrusted: None) -> None:
    dovecot.deliver(bounce(1))

    result = read_mailbox(dovecot.mailbox(Security.TLS, verify_tls=False), lambda raw: None)

    assert result.read == 1


def test_a_wrong_password_is_refused_without_showing_it(dovecot: Dovecot) -> None:
    dovecot.deliver(bounce(1))
    wrong = "Wr0ng-pa55word-42"

    with pytest.raises(MailboxError) as caught:
        read_mailbox(dovecot.mailbox(Security.NONE, password=wrong), lambda raw: None)

    err = caught.value
    assert err.failure == "login" and not err.transient, "a refused login waits for a person"
    assert "refused the login" in err.message("en") and dovecot.username in err.message("en")
    assert "a refusé la connexion" in err.message("fr")
    said = [str(err), repr(err), err.message("en"), err.message("fr"), err.hint("en"),
            err.hint("fr"), str(err.dump()), *(str(e) for e in _causes(err))]
    assert not any(wrong in (text or "") for text in said), "the password leaked"
    assert dovecot.unseen() == 1


def test_a_password_with_accents_logs_in(dovecot: Dovecot) -> None:
    dovecot.deliver(bounce(1), username=ACCENTED_USERNAME)
    mailbox = dovecot.mailbox(Security.STARTTLS, username=ACCENTED_USERNAME,
                              password=ACCENTED_PASSWORD, verify_tls=False)

    assert read_mailbox(mailbox, lambda raw: None).read == 1


def test_a_missing_folder_is_named(dovecot: Dovecot) -> None:
    with pytest.raises(MailboxError) as caught:
        read_mailbox(dovecot.mailbox(Security.NONE, folder="Retours"), lambda raw: None)

    err = caught.value
    assert err.failure == "folder" and not err.transient
    assert "The folder Retours cannot be opened" in err.message("en")
    assert "doesn't exist" in err.message("en"), "the server's own words say why"
    assert "Le dossier Retours ne peut pas être ouvert" in err.message("fr")


def test_another_folder_is_read(dovecot: Dovecot) -> None:
    with dovecot.client() as client:
        client.create_folder("Retours")
    dovecot.deliver(bounce(1), folder="Retours")
    dovecot.deliver(bounce(2))
    got: list[bytes] = []

    read_mailbox(dovecot.mailbox(Security.NONE, folder="Retours"), got.append)

    assert got == [bounce(1)]
    assert dovecot.unseen(folder="Retours") == 0 and dovecot.unseen() == 1


def test_a_closed_port_is_connection_refused(dovecot: Dovecot, closed_port: int) -> None:
    with pytest.raises(MailboxError) as caught:
        check_mailbox(dovecot.mailbox(Security.TLS, port=closed_port))

    err = caught.value
    assert err.failure == "refused" and err.transient
    assert f"nothing answers at 127.0.0.1:{closed_port} (connection refused)" in err.message()
    assert "connexion refusée" in err.message("fr")


def test_a_silent_server_times_out(dovecot: Dovecot, blackhole: int) -> None:
    with pytest.raises(MailboxError) as caught:
        check_mailbox(dovecot.mailbox(Security.TLS, port=blackhole), timeout=0.3)

    err = caught.value
    assert err.failure == "timeout" and err.transient
    assert "did not answer within 0.3 s" in err.message("en")
    assert "n'a pas répondu dans les 0.3 s" in err.message("fr")


def test_tls_on_the_plain_port_says_so(dovecot: Dovecot, trusted: Path) -> None:
    with pytest.raises(MailboxError) as caught:
        check_mailbox(dovecot.mailbox(Security.TLS, port=dovecot.imap_port))

    assert caught.value.failure == "tls_unexpected"
    assert "does not speak TLS from the first byte" in caught.value.message("en")
    assert "STARTTLS" in (caught.value.hint("en") or "")


def test_an_unknown_host_is_named(dovecot: Dovecot) -> None:
    with pytest.raises(MailboxError) as caught:
        check_mailbox(dovecot.mailbox(Security.TLS, host="imap.school.invalid"))

    assert caught.value.failure == "dns"
    assert "imap.school.invalid cannot be found" in caught.value.message("en")
    assert "est introuvable" in caught.value.message("fr")


def test_a_connection_dropped_mid_look_leaves_the_message_unread(dovecot: Dovecot) -> None:
    dovecot.deliver(bounce(1))
    dovecot.deliver(bounce(2))
    handed: list[bytes] = []

    def handle(raw: bytes) -> None:
        handed.append(raw)
        dovecot.kick()  # the server goes away before the message is marked as read

    with pytest.raises(MailboxError) as caught:
        read_mailbox(dovecot.mailbox(Security.NONE), handle)

    err = caught.value
    assert err.failure == "disconnected" and err.transient
    assert "dropped the connection" in err.message("en")
    assert "a coupé la connexion" in err.message("fr")
    assert handed == [bounce(1)]
    assert dovecot.unseen() == 2, "not marked as read: handed again at the next look"


def test_limit_leaves_the_rest_for_the_next_look(dovecot: Dovecot) -> None:
    for n in range(1, 6):
        dovecot.deliver(bounce(n))
    got: list[bytes] = []

    first = read_mailbox(dovecot.mailbox(Security.NONE), got.append, limit=2)

    assert first == MailboxRead(read=2, skipped=0, left=3)
    assert got == [bounce(1), bounce(2)], "the oldest first"
    assert dovecot.unseen() == 3
    second = read_mailbox(dovecot.mailbox(Security.NONE), got.append, limit=10)
    assert second == MailboxRead(read=3, skipped=0, left=0)
    assert got == [bounce(n) for n in range(1, 6)]


def test_a_message_too_large_is_marked_read_without_being_fetched(
        dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch) -> None:
    big = bounce(2, body=b"x" * 5000 + b"\r\n")
    for raw in (bounce(1), big, bounce(3)):
        dovecot.deliver(raw)
    fetched: list[tuple[Any, Any]] = []
    fetch = IMAPClient.fetch

    def spy(self: IMAPClient, messages: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        fetched.append((messages, data))
        return fetch(self, messages, data, *args, **kwargs)

    monkeypatch.setattr(IMAPClient, "fetch", spy)
    got: list[bytes] = []

    result = read_mailbox(dovecot.mailbox(Security.NONE), got.append, max_size=2000)

    assert result == MailboxRead(read=2, skipped=1, left=0)
    assert got == [bounce(1), bounce(3)]
    assert dovecot.unseen() == 0, "the large message is marked as read too"
    bodies = [messages for messages, data in fetched if "BODY.PEEK[]" in data]
    assert bodies == [[1], [3]], f"only the small messages are fetched whole: {fetched}"


def test_a_failing_handler_stops_the_look_and_leaves_the_rest_unread(
        dovecot: Dovecot) -> None:
    for n in (1, 2, 3):
        dovecot.deliver(bounce(n))
    boom = RuntimeError("the bounce parser failed")
    seen: list[bytes] = []

    def handle(raw: bytes) -> None:
        seen.append(raw)
        if len(seen) == 2:
            raise boom

    with pytest.raises(RuntimeError) as caught:
        read_mailbox(dovecot.mailbox(Security.NONE), handle)

    assert caught.value is boom, "the handler's own exception goes up as it is"
    assert seen == [bounce(1), bounce(2)], "the look stops at the failing message"
    assert dovecot.unseen() == 2, "the first is read; the second and third wait"
    retry: list[bytes] = []
    assert read_mailbox(dovecot.mailbox(Security.NONE), retry.append).read == 2
    assert retry == [bounce(2), bounce(3)]


def test_check_counts_unread_messages_without_reading_them(
        dovecot: Dovecot, trusted: Path) -> None:
    assert check_mailbox(dovecot.mailbox()) == 0
    dovecot.deliver(bounce(1))
    dovecot.deliver(bounce(2))

    assert check_mailbox(dovecot.mailbox()) == 2
    assert check_mailbox(dovecot.mailbox()) == 2, "checking marks nothing as read"
    assert dovecot.unseen() == 2
    read_mailbox(dovecot.mailbox(), lambda raw: None)
    assert check_mailbox(dovecot.mailbox()) == 0


def test_settings_without_a_server_or_password_are_explained(dovecot: Dovecot) -> None:
    with pytest.raises(MailboxError) as no_host:
        check_mailbox(dovecot.mailbox(host=""))
    with pytest.raises(MailboxError) as no_password:
        check_mailbox(dovecot.mailbox(password=None))

    assert no_host.value.failure == "not_configured" and not no_host.value.transient
    assert no_password.value.failure == "no_password"
    assert "Aucun mot de passe" in no_password.value.message("fr")


async def test_poll_reads_in_a_thread(dovecot: Dovecot) -> None:
    dovecot.deliver(bounce(1))
    threads: list[int] = []

    def handle(raw: bytes) -> None:
        threads.append(threading.get_ident())

    result = await poll_mailbox(dovecot.mailbox(Security.NONE), handle, limit=5)

    assert result == MailboxRead(read=1, skipped=0, left=0)
    assert threads and threads[0] != threading.get_ident(), "the event loop is not blocked"
    assert dovecot.unseen() == 0


def _causes(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur = exc.__cause__ or exc.__context__
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out
