"""Hostile SMTP clients against the real server's submission doors: smuggling variants
beyond the four of tests/e2e, STARTTLS command injection, oversized lines and messages,
slow and idle connections, and AUTH brute force."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_kit import record_figures

from postier.core.service import Postier
from postier.core.sign_in_throttle import SignInThrottle
from postier.server.config import ServerConfig
from postier.server.smtp import SubmissionConfig, self_signed, server_tls_context, start_submission

from support.relay import FaultRelay
from support.server import ServerProcess, free_port
from support.smtp_client import read_reply

ALICE = "alice.martin@ac-lyon.fr"
AUTH = base64.b64encode(b"\0alice\0motdepasse-alice").decode()
MAX_SIZE = 65536


def _tls(server: ServerProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.data_dir / "smtp-cert.pem"))


@pytest.fixture(scope="module")
def smtp(tmp_path_factory: pytest.TempPathFactory, relay_cert: tuple[Path, Path]
         ) -> Iterator[tuple[ServerProcess, FaultRelay]]:
    relay = FaultRelay(cert=relay_cert).start()
    server = ServerProcess(tmp_path_factory.mktemp("smtp"),
                           {"POSTIER_MAX_MESSAGE_SIZE": str(MAX_SIZE)})
    server.smtps_port = free_port()  # type: ignore[attr-defined]
    server.args = ["--smtps", f"127.0.0.1:{server.smtps_port}"]  # type: ignore[attr-defined]
    server.provision()
    server.start()
    server.configure_relay(relay)
    yield server, relay
    server.kill()
    relay.stop()


def session(server: ServerProcess) -> Any:
    """An authenticated implicit-TLS session, spoken byte by byte."""
    ctx = _tls(server)
    raw = socket.create_connection(("127.0.0.1", server.smtps_port), timeout=10)  # type: ignore[attr-defined]
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    assert read_reply(s).startswith(b"220")
    for line in (b"EHLO test\r\n", f"AUTH PLAIN {AUTH}\r\n".encode()):
        s.sendall(line)
        assert read_reply(s)[:1] in (b"2", b"3")
    return s


def transaction(server: ServerProcess, payload: bytes) -> bytes:
    with session(server) as s:
        for line in (f"MAIL FROM:<{ALICE}>\r\n".encode(), b"RCPT TO:<p@example.org>\r\n",
                     b"DATA\r\n"):
            s.sendall(line)
            assert read_reply(s)[:1] in (b"2", b"3")
        s.sendall(payload)
        final = read_reply(s)
        s.sendall(b"QUIT\r\n")
        return final


SMUGGLED = b"RCPT TO:<x@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n"


@pytest.mark.parametrize("end", [
    b"\r\n.\r", b"\r.\r\n", b"\n.\r", b"\n.\r\n\r\n", b"\r\r\n.\r\r\n", b"\r\n.\n\r\n",
    b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n .\r\n", b"\r\n..\r\n", b"\r\n.\t\r\n",
])
def test_smuggling_variants_yield_no_second_message(
    smtp: tuple[ServerProcess, FaultRelay], end: bytes
) -> None:
    server, relay = smtp
    tag = end.hex()
    before = len(relay.messages)
    payload = (f"Subject: first-{tag}\r\n\r\nfirst".encode() + end +
               b"MAIL FROM:<direction@ac-lyon.fr>\r\n" + SMUGGLED)
    final = transaction(server, payload)
    assert final[:3] in (b"250", b"550"), final
    deadline = time.monotonic() + (5 if final.startswith(b"250") else 0)
    while time.monotonic() < deadline and len(relay.messages) == before:
        time.sleep(0.05)
    time.sleep(0.3)
    new = relay.messages[before:]
    assert all(m.message["Subject"] != "smuggled" for m in new), new
    assert len(new) == (1 if final.startswith(b"250") else 0), (final, new)
    for m in new:
        assert m.mail_from == ALICE and m.rcpt_tos == ["p@example.org"]


def test_starttls_command_injection_is_discarded(
    smtp: tuple[ServerProcess, FaultRelay]
) -> None:
    server, _ = smtp
    with socket.create_connection(("127.0.0.1", server.smtp_port), timeout=10) as raw:
        assert read_reply(raw).startswith(b"220")
        raw.sendall(b"EHLO test\r\n")
        read_reply(raw)
        # The injected commands arrive in the same packet as STARTTLS, in clear text.
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<direction@ac-lyon.fr>\r\nNOOP\r\n")
        assert read_reply(raw).startswith(b"220")
        with _tls(server).wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"EHLO after\r\n")
            first = read_reply(s)
            assert first.startswith(b"250-"), f"an injected command was answered: {first!r}"
            s.sendall(b"NOOP\r\n")
            assert read_reply(s).startswith(b"250")


def test_oversized_lines_and_messages_are_refused_and_the_door_stays_open(
    smtp: tuple[ServerProcess, FaultRelay]
) -> None:
    server, relay = smtp
    before = len(relay.messages)
    with session(server) as s:
        s.sendall(b"NOOP " + b"a" * 5000 + b"\r\n")
        assert read_reply(s).startswith(b"500")
        s.sendall(b"X" * 2_000_000 + b"\r\n")  # two megabytes without a line end
        assert read_reply(s).startswith(b"500")
        s.sendall(b"NOOP\r\n")
        assert read_reply(s).startswith(b"250")
        for line in (f"MAIL FROM:<{ALICE}>\r\n".encode(), b"RCPT TO:<p@example.org>\r\n",
                     b"DATA\r\n"):
            s.sendall(line)
            read_reply(s)
        s.sendall(b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n")
        assert read_reply(s).startswith(b"500"), "a 5,000-byte line (RFC 5321: 1,000)"
        for line in (f"MAIL FROM:<{ALICE}>\r\n".encode(), b"RCPT TO:<p@example.org>\r\n",
                     b"DATA\r\n"):
            s.sendall(line)
            read_reply(s)
        s.sendall(b"Subject: big\r\n\r\n" + (b"z" * 900 + b"\r\n") * 200 + b".\r\n")
        assert read_reply(s).startswith(b"552"), "larger than the limit, without SIZE"
    final = transaction(server, b"Subject: normal\r\n\r\nok\r\n.\r\n")
    assert final.startswith(b"250")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(relay.messages) < before + 1:
        time.sleep(0.05)
    time.sleep(0.3)
    assert [m.message["Subject"] for m in relay.messages[before:]] == ["normal"]


def test_slow_clients_do_not_stop_the_others(smtp: tuple[ServerProcess, FaultRelay]) -> None:
    server, _ = smtp
    stop = threading.Event()
    slow: list[socket.socket] = []
    # Slowloris from one address (127.0.0.2); the others connect from 127.0.0.1. Past its
    # share of the connection slots, the slow client is turned away, not the others.
    for _ in range(30):
        try:
            c = socket.create_connection(("127.0.0.1", server.smtp_port), timeout=10,
                                         source_address=("127.0.0.2", 0))
        except OSError:
            continue
        slow.append(c)

    def dribble() -> None:
        while not stop.is_set():
            for c in slow:
                try:
                    c.sendall(b"E")  # a command that never ends
                except OSError:
                    pass
            time.sleep(0.3)

    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    took = []
    try:
        for i in range(5):
            t0 = time.monotonic()
            with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as c:
                c.starttls(context=_tls(server))
                c.login("alice", "motdepasse-alice")
                assert c.sendmail(ALICE, ["p@example.org"], f"Subject: s{i}\r\n\r\nx\r\n") == {}
            took.append(time.monotonic() - t0)
    finally:
        stop.set()
        t.join(5)
        for c in slow:
            c.close()
    assert max(took) < 3.0, took
    record_figures("SMTP slow clients", slow_connections=30,
                   submissions_while_slow=len(took), slowest_seconds=round(max(took), 2))


# -- timeouts and connection slots, in this process with short limits ------------------------


async def _door(tmp_path: Path, **limits: Any) -> tuple[Postier, asyncio.Server, int]:
    core = Postier(ServerConfig(data_dir=tmp_path, hostname="localhost"))
    await core.open()
    user = await core.add_user("alice", ALICE, password="motdepasse-alice")
    await core.put_settings(await core.add_user("admin", "d@ac-lyon.fr", role="admin"), {
        "delegation": True, "allowed_domains": ["ac-lyon.fr"],
        "relay": {"host": "127.0.0.1", "port": 9, "security": "none"}})
    assert user
    cert, key = self_signed(tmp_path, "localhost")
    port = free_port()
    door = await start_submission(core, host="127.0.0.1", port=port, implicit_tls=False,
                                  tls=server_tls_context(cert, key),
                                  config=SubmissionConfig(**limits))
    return core, door, port


async def _closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            while await reader.read(1024):
                pass
    except TimeoutError:
        return float("inf")
    return time.monotonic() - t0


async def test_idle_and_dribbling_connections_are_cut_at_the_command_timeout(
    tmp_path: Path
) -> None:
    core, door, port = await _door(tmp_path, command_timeout=1.0)
    try:
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        drib_r, drib_w = await asyncio.open_connection("127.0.0.1", port)
        await idle_r.readline()
        await drib_r.readline()

        async def dribble() -> None:
            for _ in range(20):
                drib_w.write(b"N")  # never a whole command
                await asyncio.sleep(0.2)

        task = asyncio.create_task(dribble())
        idle, dribbling = await asyncio.gather(_closed_after(idle_r, 4),
                                               _closed_after(drib_r, 4))
        task.cancel()
        assert idle < 2.5 and dribbling < 2.5, (idle, dribbling)
        for w in (idle_w, drib_w):
            w.close()
    finally:
        door.close()
        await core.close()


async def _login_and_start_data(port: int, ctx: ssl.SSLContext
                                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        line = await r.readline()
        while line[3:4] == b"-":
            line = await r.readline()
        return line

    await reply()
    for cmd in (b"EHLO t\r\n", b"STARTTLS\r\n"):
        w.write(cmd)
        await reply()
    await w.start_tls(ctx, server_hostname="localhost")
    for cmd in (b"EHLO t\r\n", f"AUTH PLAIN {AUTH}\r\n".encode(),
                f"MAIL FROM:<{ALICE}>\r\n".encode(), b"RCPT TO:<p@example.org>\r\n",
                b"DATA\r\n"):
        w.write(cmd)
        assert (await reply())[:1] in (b"2", b"3")
    r.reply = reply  # type: ignore[attr-defined]
    return r, w


async def test_a_slow_but_steady_message_is_not_cut(tmp_path: Path) -> None:
    # A large attachment over a slow link: the data keeps coming for longer than the
    # command timeout in all, never silent for that long. It is accepted and stored.
    core, door, port = await _door(tmp_path, command_timeout=1.0)
    ctx = ssl.create_default_context(cafile=str(tmp_path / "smtp-cert.pem"))
    try:
        r, w = await _login_and_start_data(port, ctx)
        w.write(b"Subject: bulletin trimestriel\r\n\r\n")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.5:
            w.write(b"ligne " * 10 + b"\r\n")
            await w.drain()
            await asyncio.sleep(0.3)
        w.write(b".\r\n")
        final = await asyncio.wait_for(r.reply(), 10)  # type: ignore[attr-defined]
        assert final.startswith(b"250"), final
        stored = await core.store.get_message(final.split()[-1].decode())
        assert stored is not None and stored.subject == "bulletin trimestriel"
        w.close()

        # Silent in the middle of its data, a client is still cut at the timeout.
        r, w = await _login_and_start_data(port, ctx)
        w.write(b"Subject: interrompu\r\n\r\ndebut\r\n")
        assert await _closed_after(r, 4) < 2.5
        w.close()
    finally:
        door.close()
        await core.close()


async def test_a_message_whose_data_never_ends_is_cut_at_the_data_deadline(
    tmp_path: Path
) -> None:
    core, door, port = await _door(tmp_path, command_timeout=1.0, data_timeout=2.0)
    ctx = ssl.create_default_context(cafile=str(tmp_path / "smtp-cert.pem"))
    try:
        r, w = await _login_and_start_data(port, ctx)

        async def dribble() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(40):
                    w.write(b"encore\r\n")
                    await asyncio.sleep(0.2)

        task = asyncio.create_task(dribble())
        closed = await _closed_after(r, 6)
        task.cancel()
        assert 1.5 < closed < 3.5, closed
        w.close()
    finally:
        door.close()
        await core.close()


async def test_one_client_cannot_take_every_connection_slot(tmp_path: Path) -> None:
    core, door, port = await _door(tmp_path, max_connections=10, command_timeout=30)
    hog: list[asyncio.StreamWriter] = []
    try:
        for _ in range(10):
            r, w = await asyncio.open_connection("127.0.0.1", port,
                                                 local_addr=("127.0.0.2", 0))
            await r.readline()
            hog.append(w)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        greeting = await r.readline()
        w.close()
        assert greeting.startswith(b"220"), greeting
    finally:
        for w in hog:
            w.close()
        door.close()
        await core.close()


# -- AUTH brute force ------------------------------------------------------------------------


def _auth(server: ServerProcess, user: str, password: str, source: str) -> int:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10,
                      source_address=(source, 0)) as c:
        c.starttls(context=_tls(server))
        c.ehlo()
        code, _ = c.docmd("AUTH", "PLAIN " + base64.b64encode(
            f"\0{user}\0{password}".encode()).decode())
        return code


def test_auth_brute_force_is_throttled_per_address_and_logged(
    server_factory: Any
) -> None:
    server: ServerProcess = server_factory().start()
    attacker, honest = "127.0.0.2", "127.0.0.1"
    limit = SignInThrottle.ADDRESS_LIMIT
    t0 = time.monotonic()
    codes = [_auth(server, f"user{i}", f"guess-{i}-secret", attacker) for i in range(5)]
    slow = time.monotonic() - t0
    codes += [_auth(server, f"user{i}", f"guess-{i}-secret", attacker) for i in range(5, limit)]
    assert codes == [535] * limit
    assert slow >= 2.5, "each failure costs the guesser half a second"
    # Spraying names from one address: now even a right password waits there...
    assert _auth(server, "bob", "motdepasse-bob", attacker) == 454
    # ...while another address signs in as usual.
    assert _auth(server, "bob", "motdepasse-bob", honest) == 235
    # In one connection, the limit for one name from one address holds too.
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10,
                      source_address=("127.0.0.3", 0)) as c:
        c.starttls(context=_tls(server))
        c.ehlo()
        answers = [c.docmd("AUTH", "PLAIN " + base64.b64encode(
            f"\0x\0bad-secret-{i}".encode()).decode())[0] for i in range(7)]
    assert answers[:5] == [535] * 5 and set(answers[5:]) == {454}, answers
    log = server.log()
    assert log.count("AUTH failed for") >= 10
    assert "too many failures" in log
    assert "guess-" not in log and "bad-secret" not in log and "motdepasse" not in log, \
        "passwords never reach the log"
    record_figures("SMTP AUTH brute force", failures_before_throttle=limit,
                   seconds_for_5_guesses=round(slow, 2),
                   throttle="454 per account from an address, per account, per address")
