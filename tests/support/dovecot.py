"""A private Dovecot IMAP server on 127.0.0.1 for the bounce-mailbox tests.

Each test gets its own ``dovecot -F -c <tmp>/dovecot.conf``, not the system's service:
everything (configuration, sockets, state, log, the Maildir) lives in a temporary
directory, and it listens on two free ports of 127.0.0.1, one plain IMAP port offering
STARTTLS and one implicit TLS port, with the session's self-signed certificate
(:func:`support.certs.make_self_signed`). Two accounts: ``bounces`` (an ASCII password)
and ``ecole`` (a password with accents). Dovecot starts quickly enough for a fresh server
per test, so no test sees another's messages.

Dovecot is run as root, as its package runs it: it gives the mail processes to ``nobody``
(it refuses root for mail) and its own ``dovecot``/``dovenull`` users to the rest. When
Dovecot is missing (``make install`` installs it) or the tests do not run as root, they
fail in CI and are skipped on a developer's machine.
"""

from __future__ import annotations

import imaplib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient

from postier.core.settings import BounceMailbox, Security

from .certs import make_self_signed

HOST = "127.0.0.1"
USERNAME = "bounces"
PASSWORD = "s3cret-b0unces"
ACCENTED_USERNAME = "ecole"
ACCENTED_PASSWORD = "mot-de-passe-été"
MAIL_USER = "nobody"
START_TIMEOUT = 10.0  # seconds for Dovecot to log a user in
STOP_GRACE = 1.0  # seconds for Dovecot to stop by itself before it is killed

CONFIG = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
protocols = imap
listen = {host}
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
# The plain port takes passwords too: the tests of security "none" log in there.
disable_plaintext_auth = no
auth_mechanisms = plain login
# A refused password answers at once instead of after Dovecot's usual 2 s, and the
# tests' next logins from 127.0.0.1 are not slowed down as after a guessing attack.
auth_failure_delay = 0
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = {dir}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={dir}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = {host}
    port = {imaps_port}
    ssl = yes
  }}
}}
"""


@dataclass(frozen=True)
class Dovecot:
    """A running private Dovecot and what a test needs to talk to it."""

    host: str
    imap_port: int
    imaps_port: int
    username: str
    password: str
    cert_path: Path
    log_path: Path
    config_path: Path

    def mailbox(self, security: Security = Security.TLS, **changes: Any) -> BounceMailbox:
        """The bounce-mailbox settings for this server with ``security`` (on the TLS port
        for TLS, on the plain port otherwise); ``changes`` override any field."""
        port = self.imaps_port if security == Security.TLS else self.imap_port
        fields: dict[str, Any] = {"host": self.host, "port": port, "security": security,
                                  "username": self.username, "password": self.password}
        return BounceMailbox(**(fields | changes))

    @contextmanager
    def client(self, username: str = USERNAME) -> Iterator[IMAPClient]:
        """A logged-in IMAP connection of the tests' own, on the plain port."""
        password = ACCENTED_PASSWORD if username == ACCENTED_USERNAME else PASSWORD
        client = IMAPClient(self.host, port=self.imap_port, ssl=False, timeout=10)
        try:
            if password.isascii():
                client.login(username, password)
            else:
                client.plain_login(username, password)
            yield client
        finally:
            client.logout()

    def deliver(self, raw: bytes, username: str = USERNAME, folder: str = "INBOX") -> None:
        """Put a message in the mailbox as a mail server would: unread, no flag."""
        with self.client(username) as client:
            client.append(folder, raw, flags=())

    def unseen(self, username: str = USERNAME, folder: str = "INBOX") -> int:
        """How many messages of the folder are not marked as read."""
        with self.client(username) as client:
            client.select_folder(folder, readonly=True)
            return len(client.search(["UNSEEN"]))

    def kick(self, username: str = USERNAME) -> None:
        """Cut the user's open connections, as an administrator (or a restarting server)
        does: the server says BYE and closes them."""
        doveadm = shutil.which("doveadm") or "/usr/bin/doveadm"
        subprocess.run([doveadm, "-c", str(self.config_path), "kick", username],
                       check=True, capture_output=True, timeout=10)

    def count(self, username: str = USERNAME, folder: str = "INBOX") -> int:
        """How many messages the folder holds, read or not."""
        with self.client(username) as client:
            return int(client.select_folder(folder, readonly=True)[b"EXISTS"])


def dovecot_binary() -> str | None:
    # /usr/sbin is not on every user's PATH, and that is where Debian puts it.
    return shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/usr/local/sbin")


def _missing() -> str | None:
    """Why a private Dovecot cannot run here, or None."""
    if dovecot_binary() is None:
        return "Dovecot is not installed: `make install` installs it (package dovecot-imapd)"
    if os.geteuid() != 0:
        return ("a private Dovecot must start as root (it hands the mail to `nobody`); "
                "run these tests as root, as CI does")
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _serving(port: int) -> bool:
    """Whether a login and a look at the mailbox work: every part of Dovecot is up (the
    ports alone answer before the authentication service does)."""
    try:
        client = IMAPClient(HOST, port=port, ssl=False, timeout=2)
        client.login(USERNAME, PASSWORD)
        client.select_folder("INBOX", readonly=True)
        client.logout()
    except (OSError, imaplib.IMAP4.error):
        return False
    return True


def _prepare(directory: Path) -> tuple[Path, Path]:
    """The certificate, the accounts and a Maildir root the mail user may write to."""
    # mkdtemp makes the directory private to root; the mail processes run as `nobody`
    # and must pass through it to reach their Maildir.
    directory.chmod(0o711)
    cert, key = make_self_signed(directory / "tls")
    (directory / "users").write_text(
        f"{USERNAME}:{{PLAIN}}{PASSWORD}\n{ACCENTED_USERNAME}:{{PLAIN}}{ACCENTED_PASSWORD}\n",
        encoding="utf-8")
    mail = directory / "mail"
    mail.mkdir()
    user = pwd.getpwnam(MAIL_USER)
    os.chown(mail, user.pw_uid, user.pw_gid)
    return cert, key


class _PortTaken(Exception):
    """Another process took a port between its choice and Dovecot's start."""


def _start(binary: str, directory: Path, cert: Path, key: Path
           ) -> tuple[subprocess.Popen[bytes], int, int]:
    """Dovecot listening on both its ports and logging users in; fails the test with
    Dovecot's own words if it does not."""
    user = pwd.getpwnam(MAIL_USER)
    imap_port, imaps_port = _free_port(), _free_port()
    conf = directory / "dovecot.conf"
    conf.write_text(CONFIG.format(dir=directory, host=HOST, cert=cert, key=key,
                                  uid=user.pw_uid, gid=user.pw_gid, imap_port=imap_port,
                                  imaps_port=imaps_port), encoding="utf-8")
    output = directory / "dovecot.out"
    with output.open("wb") as out:
        # Its own session, so that stopping it reaches every process it forked.
        proc = subprocess.Popen([binary, "-F", "-c", str(conf)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not (_listening(imaps_port) and _serving(imap_port)):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            said = "\n".join(p.read_text(errors="replace")
                             for p in (output, directory / "dovecot.log") if p.exists())
            if "Address already in use" in said:
                raise _PortTaken(said)
            pytest.fail(f"the test Dovecot did not listen on {HOST}:{imap_port} and "
                        f":{imaps_port} within {START_TIMEOUT} s (exit code {proc.returncode})"
                        f"\n{said}")
        time.sleep(0.005)  # polling, bounded by the deadline above
    return proc, imap_port, imaps_port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop Dovecot and every process of its group, leaving none behind."""
    # The whole group at once: the master then only reaps its children, where signalled
    # alone it is slower to stop them. A child caught starting up may not stop: SIGKILL
    # after a short while.
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def running_dovecot() -> Iterator[Dovecot]:
    """A private Dovecot for the time of the ``with`` block, removed with its files."""
    binary = dovecot_binary()
    assert binary is not None, _missing()
    directory = Path(tempfile.mkdtemp(prefix="postier-dovecot-"))
    try:
        cert, key = _prepare(directory)
        for attempt in range(3):
            try:
                proc, imap_port, imaps_port = _start(binary, directory, cert, key)
                break
            except _PortTaken as exc:
                if attempt == 2:
                    pytest.fail(f"the test Dovecot found its ports taken three times:\n{exc}")
        try:
            yield Dovecot(host=HOST, imap_port=imap_port, imaps_port=imaps_port,
                          username=USERNAME, password=PASSWORD, cert_path=cert,
                          log_path=directory / "dovecot.log",
                          config_path=directory / "dovecot.conf")
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    """A fresh private Dovecot with empty mailboxes for the test."""
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the IMAP tests need Dovecot in CI: {missing}")
        pytest.skip(missing)
    with running_dovecot() as server:
        yield server
