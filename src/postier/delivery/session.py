"""Sending e-mails over an open relay connection, pipelined when the relay allows it.

aiosmtplib opens and secures the connection (greeting, EHLO, STARTTLS or TLS, AUTH:
:func:`postier.delivery.connection.open_smtp`); then :meth:`RelaySession.take_over` moves the
transport to a small protocol of ours that keeps every reply in order. That lets the
transactions use RFC 2920 PIPELINING — ``MAIL``, every ``RCPT`` and ``DATA`` written at
once, then the message — so an e-mail costs two round trips instead of 3 + recipients,
and one event-loop wake-up per round trip instead of one per command. aiosmtplib cannot do
this: its protocol drops a reply that arrives before it is waited for, on purpose.

A relay that does not advertise PIPELINING gets the same commands one at a time. Replies
are read strictly in order; a reply nobody asked for (a relay closing an idle connection
with ``421``, or a confused one) makes the connection unusable rather than shifting the
answers of the next e-mail.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Sequence
from typing import cast

import aiosmtplib

# A whole reply (with its continuation lines) may not exceed this: bounds memory when a
# relay streams garbage (the same bound as aiosmtplib's).
MAX_REPLY = 8192 * 4
# C0 controls and DEL in an address would inject commands (addresses are checked when
# accepted; this is the last line of defence).
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")

Reply = tuple[int, str]


class _Replies(asyncio.Protocol):
    """The connection's protocol once taken over: parses replies into a queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self.replies: collections.deque[Reply] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.lost: BaseException | None = None
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self.transport: asyncio.BaseTransport | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            line = bytes(buf[start:end + 1])
            start = end + 1
            try:
                code = int(line[:3])
            except ValueError:
                self._broken(aiosmtplib.SMTPServerDisconnected(
                    "Malformed SMTP response line: "
                    + line.decode("utf-8", "replace").strip()[:200]))
                return
            self._lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                text = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
                self._lines = []
                self.replies.append((code, text))
        if start:
            del buf[:start]
        if len(buf) + sum(map(len, self._lines)) > MAX_REPLY:
            self._broken(aiosmtplib.SMTPServerDisconnected("Response too long"))
            return
        if self.replies:
            self._wake()

    def eof_received(self) -> bool:
        self._lost(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        err = aiosmtplib.SMTPServerDisconnected("Connection lost")
        err.__cause__ = exc
        self._lost(err)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- for the session -----------------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        self._wake()

    def _broken(self, exc: BaseException) -> None:
        self._lost(exc)
        self._buffer.clear()
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self, count: int, timeout: float, out: list[Reply]) -> None:  # noqa: ASYNC109
        """Append the next ``count`` replies to ``out``, each awaited at most ``timeout``
        seconds (``out`` holds those that came when a later one fails)."""
        replies = self.replies
        want = len(out) + count
        while True:
            while replies and len(out) < want:
                out.append(replies.popleft())
            if len(out) == want:
                return
            if self.lost is not None:
                raise self.lost
            waiter = self._loop.create_future()
            self._waiter = waiter
            timer = self._loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None

    async def drain(self) -> None:
        if self._paused and self.lost is None:
            self._drained = self._loop.create_future()
            await self._drained


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(aiosmtplib.SMTPReadTimeoutError(
            "Timed out waiting for server response"))


class RelaySession:
    """An open, greeted, secured and authenticated connection to a relay."""

    def __init__(self, transport: asyncio.Transport, protocol: _Replies,
                 extensions: dict[str, str], timeout: float, pipelining: bool = True) -> None:
        self.transport = transport
        self._protocol = protocol
        self.extensions = extensions
        self.pipelining = pipelining and "pipelining" in extensions
        self.timeout = timeout
        # The recording of the last e-mail's result, still running (see content()).
        self.unsettled: asyncio.Future[None] | None = None

    @classmethod
    def take_over(cls, smtp: aiosmtplib.SMTP, timeout: float,
                  pipelining: bool = True) -> RelaySession:
        """Take the connection aiosmtplib opened; ``smtp`` must not be used afterwards.
        ``pipelining=False``: one command at a time even if the relay offers PIPELINING
        (the relay setting, for a server that mishandles it)."""
        old = smtp.protocol
        transport = cast(asyncio.Transport | None, old.transport if old is not None else None)
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        protocol = _Replies(asyncio.get_running_loop())
        transport.set_protocol(protocol)
        protocol.transport = transport
        session = cls(transport, protocol, dict(smtp.esmtp_extensions), timeout, pipelining)
        if getattr(old, "_buffer", b""):
            # The relay said something nobody asked for before the first e-mail.
            session.close()
        return session

    @property
    def is_connected(self) -> bool:
        """Open, and not out of step: no reply is waiting that no command asked for."""
        return (self._protocol.lost is None and not self.transport.is_closing()
                and not self._protocol.replies)

    def supports_extension(self, name: str) -> bool:
        return name.lower() in self.extensions

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    async def command(self, line: bytes) -> Reply:
        """One command, its reply (RSET, QUIT, NOOP)."""
        self._write(line)
        out: list[Reply] = []
        await self._protocol.read(1, self.timeout, out)
        return out[0]

    async def rset(self) -> None:
        code, text = await self.command(b"RSET\r\n")
        if code != 250:
            raise aiosmtplib.SMTPResponseException(code, text)

    async def quit(self) -> None:
        try:
            await self.command(b"QUIT\r\n")
        finally:
            self.close()

    def _write(self, data: bytes) -> None:
        if self._protocol.lost is not None:
            raise self._protocol.lost
        if self._protocol.replies:
            # Out of step: the next reply read would be the answer to something else.
            self.close()
            raise aiosmtplib.SMTPServerDisconnected(
                "The relay sent a reply nobody asked for")
        self.transport.write(data)

    async def envelope(self, mail: bytes, rcpts: Sequence[bytes], out: list[Reply]) -> None:
        """``MAIL``, the ``RCPT``s and ``DATA``; their replies appended to ``out``, in
        order. Without PIPELINING each is sent once the previous one is answered, and a
        refusal that makes the rest pointless (the sender's, or every recipient's) stops
        there."""
        read = self._protocol.read
        timeout = self.timeout
        if self.pipelining:
            self._write(b"".join((mail, *rcpts, b"DATA\r\n")))
            await read(len(rcpts) + 2, timeout, out)
            return
        self._write(mail)
        await read(1, timeout, out)
        if out[0][0] != 250:
            return
        for rcpt in rcpts:
            self._write(rcpt)
            await read(1, timeout, out)
        if any(code in (250, 251) for code, _ in out[1:]):
            self._write(b"DATA\r\n")
            await read(1, timeout, out)

    async def content(self, data: bytes) -> Reply:
        """The message after a ``354``, and the relay's final reply to it. The result of
        the connection's last e-mail is recorded first: while it is written, this e-mail's
        envelope goes out, yet the relay takes no second e-mail whose predecessor's result
        the store does not hold (a worker killed repeats at most one per connection)."""
        if self.unsettled is not None:
            previous, self.unsettled = self.unsettled, None
            await asyncio.wait([previous])
            if previous.cancelled() or previous.exception() is not None:
                self.close()
                raise aiosmtplib.SMTPServerDisconnected(
                    "the last e-mail's result could not be recorded")
        self._write(wire_format(data))
        await self._protocol.drain()  # a big message: the timeout starts once it is sent
        out: list[Reply] = []
        await self._protocol.read(1, self.timeout, out)
        return out[0]

    async def abandon_data(self) -> None:
        """After a ``354`` for an e-mail that will not be sent (every recipient refused):
        an empty message ends the command, which the relay refuses for want of
        recipients or discards."""
        await self.command(b".\r\n")


def path(address: str, smtputf8: bool) -> bytes:
    """``<address>`` for MAIL or RCPT, refusing anything that would inject a command."""
    raw = address.encode("utf-8" if smtputf8 else "ascii")
    if _CONTROL.search(raw):
        raise ValueError("Command arg contains a prohibited control character")
    return b"<" + raw + b">"


def wire_format(data: bytes) -> bytes:
    """The message as sent after ``DATA``: CRLF line endings, leading dots doubled, the
    final ``.`` line. Accepted messages are already CRLF: then this only checks."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = _LINE_ENDINGS.sub(b"\r\n", data)
    if data.startswith(b".") or b"\n." in data:
        data = _LEADING_DOT.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def mail_command(envelope_from: str, size: int, *, smtputf8: bool,
                 extensions: dict[str, str]) -> bytes:
    options = []
    if smtputf8:
        options.append(b" SMTPUTF8")
    if "8bitmime" in extensions:
        options.append(b" BODY=8BITMIME")
    if "size" in extensions:
        options.append(b" SIZE=%d" % size)
    return b"MAIL FROM:" + path(envelope_from, smtputf8) + b"".join(options) + b"\r\n"
