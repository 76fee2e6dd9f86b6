"""The pipelined SMTP conversation of delivery (``delivery/session.py``) against a scripted
relay that records what arrives in each read and answers as told.

aiosmtpd (``FaultRelay``) reads pipelined commands correctly but cannot show how they
arrived or misbehave at the protocol level (an unsolicited reply, a 354 with no
recipient, a malformed line), hence this small raw server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postier.core.settings import RelaySettings
from postier.delivery.pool import RelayPool
from postier.delivery.session import wire_format

from support.relay import FaultRelay

RAW = (b"From: Alice <alice@ac-lyon.fr>\r\nTo: parents@example.org\r\nSubject: Sortie\r\n"
       b"\r\nBonjour.\r\n.Une ligne qui commence par un point.\r\n")


class ScriptedRelay:
    """A raw SMTP server: ``chunks`` holds the commands of each read, ``messages`` the
    envelopes and contents it accepted."""

    def __init__(self, *, pipelining: bool = True) -> None:
        self.pipelining = pipelining
        self.rcpt: Callable[[str], bytes] = lambda _addr: b"250 2.1.5 Ok"
        self.mail_reply = b"250 2.1.0 Ok"
        self.data_reply: bytes | None = None  # None: 354 when a recipient was accepted
        self.malformed_mail_reply = False
        self.close_after_mail = False  # hang up right after the reply to MAIL
        self.after_message: bytes | None = None  # sent, unasked, after each message
        self.chunks: list[list[str]] = []
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.connections = 0
        self.abandoned = 0  # contents received after a 354 with no recipient
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()

    def relay(self) -> RelaySettings:
        return RelaySettings(host="127.0.0.1", port=self.port, security="none", timeout=2)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 scripted ESMTP\r\n")
        buffer = b""
        sender, rcpts = "", []
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                buffer += data
                *lines, buffer = buffer.split(b"\r\n")
                self.chunks.append([line.decode() for line in lines])
                for line in lines:
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        writer.write(b"250-scripted\r\n250-8BITMIME\r\n"
                                     + (b"250-PIPELINING\r\n" if self.pipelining else b"")
                                     + b"250 SIZE 10240000\r\n")
                    elif verb == b"MAIL":
                        sender, rcpts = _path(line), []
                        writer.write(b"hello\r\n" if self.malformed_mail_reply
                                     else self.mail_reply + b"\r\n")
                        if self.close_after_mail:
                            await writer.drain()
                            return
                    elif verb == b"RCPT":
                        reply = self.rcpt(_path(line))
                        if reply.startswith(b"25"):
                            rcpts.append(_path(line))
                        writer.write(reply + b"\r\n")
                    elif verb == b"DATA":
                        reply = self.data_reply or (
                            b"354 End data with <CR><LF>.<CR><LF>" if rcpts
                            else b"554 5.5.1 No valid recipients")
                        writer.write(reply + b"\r\n")
                        if reply.startswith(b"354"):
                            content, buffer = await _content(reader, buffer)
                            if rcpts:
                                self.messages.append((sender, rcpts, content))
                                writer.write(b"250 2.0.0 Ok: queued\r\n")
                            else:
                                self.abandoned += 1
                                writer.write(b"554 5.5.1 No valid recipients\r\n")
                            if self.after_message:
                                writer.write(self.after_message + b"\r\n")
                    elif verb == b"RSET":
                        sender, rcpts = "", []
                        writer.write(b"250 2.0.0 Ok\r\n")
                    elif verb == b"QUIT":
                        writer.write(b"221 2.0.0 Bye\r\n")
                        await writer.drain()
                        return
                    else:
                        writer.write(b"502 5.5.2 Error: command not recognized\r\n")
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()


def _path(line: bytes) -> str:
    match = re.search(rb"<([^>]*)>", line)
    assert match is not None, line
    return match.group(1).decode()


async def _content(reader: asyncio.StreamReader, buffer: bytes) -> tuple[bytes, bytes]:
    while b"\r\n.\r\n" not in b"\r\n" + buffer:
        more = await reader.read(65536)
        if not more:
            raise ConnectionResetError("the client left during DATA")
        buffer += more
    body, _, rest = (b"\r\n" + buffer).partition(b"\r\n.\r\n")
    lines = body[2:].split(b"\r\n") if body[2:] else []
    return b"".join(line[1:] + b"\r\n" if line.startswith(b".") else line + b"\r\n"
                    for line in lines), rest


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedRelay]:
    relay = ScriptedRelay()
    await relay.start()
    yield relay
    await relay.stop()


async def _send(pool: RelayPool, scripted: ScriptedRelay, *rcpts: str, data: bytes = RAW):
    return await pool.send(scripted.relay(), "vie.scolaire@ac-lyon.fr", list(rcpts), data,
                           limit=10)


async def test_envelope_goes_in_one_write_when_the_relay_pipelines(
    scripted: ScriptedRelay,
) -> None:
    pool = RelayPool()
    result = await _send(pool, scripted, "a@example.org", "b@example.org")
    await pool.close()
    assert [r.status for r in result.recipients] == ["sent", "sent"]
    assert [f"MAIL FROM:<vie.scolaire@ac-lyon.fr> BODY=8BITMIME SIZE={len(RAW)}",
            "RCPT TO:<a@example.org>", "RCPT TO:<b@example.org>", "DATA"] in scripted.chunks
    [(sender, rcpts, content)] = scripted.messages
    assert (sender, rcpts, content) == ("vie.scolaire@ac-lyon.fr",
                                        ["a@example.org", "b@example.org"], RAW)


async def test_one_command_at_a_time_without_pipelining(scripted: ScriptedRelay) -> None:
    scripted.pipelining = False
    pool = RelayPool()
    result = await _send(pool, scripted, "a@example.org", "b@example.org")
    await pool.close()
    assert [r.status for r in result.recipients] == ["sent", "sent"]
    commands = [c for c in scripted.chunks if c and not c[0].startswith("EHLO")]
    assert all(len(c) == 1 for c in commands[:4]), commands
    assert [c[0].split(":")[0] for c in commands[:4]] == ["MAIL FROM", "RCPT TO", "RCPT TO",
                                                          "DATA"]
    assert scripted.messages[0][2] == RAW


async def test_one_command_at_a_time_when_the_setting_says_so(scripted: ScriptedRelay) -> None:
    # The relay offers PIPELINING but mishandles it: the administrator unticks it.
    relay = scripted.relay().model_copy(update={"pipelining": False})
    pool = RelayPool()
    result = await pool.send(relay, "vie.scolaire@ac-lyon.fr", ["a@example.org"], RAW,
                             limit=10)
    await pool.close()
    assert [r.status for r in result.recipients] == ["sent"]
    commands = [c for c in scripted.chunks if c and not c[0].startswith("EHLO")]
    assert [c[0].split(":")[0] for c in commands[:3]] == ["MAIL FROM", "RCPT TO", "DATA"]
    assert all(len(c) == 1 for c in commands[:3]), commands
    assert scripted.messages[0][2] == RAW


async def test_each_recipient_gets_its_own_answer_in_a_pipelined_group(
    scripted: ScriptedRelay,
) -> None:
    scripted.rcpt = lambda a: {"gone@example.org": b"550 5.1.1 No such user",
                               "full@example.org": b"452 4.2.2 Mailbox full"}.get(
        a, b"250 2.1.5 Ok")
    pool = RelayPool()
    result = await _send(pool, scripted, "gone@example.org", "ok@example.org",
                         "full@example.org")
    await pool.close()
    by = {r.address: r for r in result.recipients}
    assert (by["gone@example.org"].status, by["gone@example.org"].code) == ("failed", 550)
    assert (by["full@example.org"].status, by["full@example.org"].code) == ("deferred", 452)
    assert by["ok@example.org"].status == "sent"
    assert [m[1] for m in scripted.messages] == [["ok@example.org"]]


async def test_a_354_after_every_recipient_was_refused_sends_nothing(
    scripted: ScriptedRelay,
) -> None:
    # A relay that accepts DATA although it refused every recipient (RFC 2920 says it
    # should not): the e-mail is not sent, the connection stays usable.
    scripted.rcpt = lambda _a: b"550 5.1.1 No such user"
    scripted.data_reply = b"354 go ahead"
    pool = RelayPool()
    first = await _send(pool, scripted, "gone@example.org")
    scripted.rcpt = lambda _a: b"250 2.1.5 Ok"
    scripted.data_reply = None
    second = await _send(pool, scripted, "ok@example.org")
    await pool.close()
    assert [(r.status, r.code) for r in first.recipients] == [("failed", 550)]
    assert [r.status for r in second.recipients] == ["sent"]
    assert [m[1] for m in scripted.messages] == [["ok@example.org"]]
    assert scripted.connections == 1
    assert scripted.abandoned == 1 and ["RSET"] in scripted.chunks


async def test_a_reply_nobody_asked_for_never_answers_the_next_e_mail(
    scripted: ScriptedRelay,
) -> None:
    # The relay says something unasked after the first e-mail (here a 550 that could pass
    # for the next sender's refusal): the connection is dropped, the next e-mail goes
    # through a new one and is sent.
    scripted.after_message = b"550 5.7.1 You are out of step"
    pool = RelayPool()
    first = await _send(pool, scripted, "a@example.org")
    await asyncio.sleep(0.1)
    second = await _send(pool, scripted, "b@example.org")
    await pool.close()
    assert [r.status for r in first.recipients] == ["sent"]
    assert [r.status for r in second.recipients] == ["sent"]
    assert scripted.connections == 2
    assert [m[1] for m in scripted.messages] == [["a@example.org"], ["b@example.org"]]


async def test_a_malformed_reply_defers_with_an_explanation(scripted: ScriptedRelay) -> None:
    scripted.malformed_mail_reply = True
    pool = RelayPool()
    result = await _send(pool, scripted, "a@example.org")
    await pool.close()
    assert [r.status for r in result.recipients] == ["deferred"]
    assert result.error is not None and result.error.code == "disconnected"
    assert "Malformed SMTP response line: hello" in result.error.message("en")
    assert scripted.messages == []


async def test_refused_sender_answers_every_recipient_and_keeps_the_connection(
    scripted: ScriptedRelay,
) -> None:
    scripted.mail_reply = b"553 5.7.1 Sender address rejected"
    pool = RelayPool()
    result = await _send(pool, scripted, "a@example.org", "b@example.org")
    scripted.mail_reply = b"250 2.1.0 Ok"
    again = await _send(pool, scripted, "a@example.org")
    await pool.close()
    assert [(r.status, r.code) for r in result.recipients] == [("failed", 553)] * 2
    assert result.error is not None and result.error.code == "sender_refused"
    assert [r.status for r in again.recipients] == ["sent"]
    assert scripted.connections == 1


async def test_lines_are_dot_stuffed_and_line_endings_made_crlf(
    scripted: ScriptedRelay,
) -> None:
    data = b"Subject: x\n\n.\n..two\r\nbare\rcr\r\n.end"
    pool = RelayPool()
    result = await _send(pool, scripted, "a@example.org", data=data)
    await pool.close()
    assert [r.status for r in result.recipients] == ["sent"]
    assert scripted.messages[0][2] == b"Subject: x\r\n\r\n.\r\n..two\r\nbare\r\ncr\r\n.end\r\n"


@given(st.binary(max_size=300))
def test_wire_format_is_what_a_relay_reads_back(data: bytes) -> None:
    wire = wire_format(data)
    assert wire.endswith(b"\r\n.\r\n") or wire == b"\r\n.\r\n"
    body = wire[: -len(b".\r\n")]
    lines = body.split(b"\r\n")[:-1]
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    unstuffed = [line[1:] if line.startswith(b".") else line for line in lines]
    expected = re.sub(rb"\r\n|\n|\r", b"\r\n", data)
    if not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert b"".join(line + b"\r\n" for line in unstuffed) == expected


async def test_commands_leave_at_once_without_waiting_for_acks(scripted: ScriptedRelay) -> None:
    # Nagle's algorithm would hold a message back behind the ACK of the envelope's group.
    import socket

    from postier.delivery.connection import open_session

    session = await open_session(scripted.relay())
    sock = session.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    await session.quit()


async def test_a_sender_refused_then_a_hang_up_is_explained_by_the_reply(
    scripted: ScriptedRelay,
) -> None:
    # Pipelined: the RCPT and DATA replies never come, yet the relay's 421 is what the
    # e-mail's history says, and a "try again later" counts as slowing down, not as the
    # relay failing.
    scripted.mail_reply = b"421 4.7.0 Try again later, closing connection (rate limit)"
    scripted.close_after_mail = True
    pool = RelayPool()
    result = await _send(pool, scripted, "a@example.org", "b@example.org")
    await pool.close()
    assert [(r.status, r.code) for r in result.recipients] == [("deferred", 421)] * 2
    assert result.error is not None and result.error.code == "rate_limited"
    assert "Try again later" in result.error.message("en")


async def test_a_relay_down_is_tried_again_at_once_with_changed_settings(
    relay: FaultRelay,
) -> None:
    # The relay refuses connections; its administrator fixes the settings and asks for a
    # retry at once: the e-mail goes, instead of the failure of a second ago coming back.
    pool = RelayPool(concurrency=1, down_for=60)
    settings = RelaySettings(host=relay.host, port=relay.port, security="none", timeout=5)
    relay.down()
    first = await pool.send(settings, "vie.scolaire@ac-lyon.fr", ["a@example.org"], RAW)
    assert first.error is not None and first.error.code == "refused", first
    relay.up()
    again = await pool.send(settings, "vie.scolaire@ac-lyon.fr", ["a@example.org"], RAW)
    assert again.error is not None and again.error.code == "refused", (
        "with the same settings, the relay stays down for the window")
    fixed = settings.model_copy(update={"timeout": 10})
    result = await pool.send(fixed, "vie.scolaire@ac-lyon.fr", ["a@example.org"], RAW)
    await pool.close()
    assert result.error is None and [r.status for r in result.recipients] == ["sent"], (
        f"the relay with its new settings should be tried at once: {result}")
