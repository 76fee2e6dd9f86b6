"""The SMTP conversation of a test-send, line by line, for a help desk.

What Postier sent and what the relay answered, on the test's own connection, with the
AUTH payloads (a password, a username, a token) masked and the message summed up by its
size; bounded for a chatty server.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import aiosmtplib

from postier.delivery.session import RelaySession

# The conversation kept in a report: enough for a help desk, bounded for a chatty server.
MAX_CONVERSATION_LINES = 200
MAX_LINE = 300
# What stands for a secret in the conversation.
MASK = "********"


class Transcript:
    """The SMTP conversation of one test, line by line (``C:`` what Postier sent, ``S:``
    what the server answered), for the help desk. The AUTH payloads (a password, a
    username, a token) are masked, and the message itself is summed up by its size.

    It listens on the test's own connection, at the level of commands and replies (so
    after TLS, and whatever the event loop): aiosmtplib's protocol from the greeting to
    the authentication (:meth:`attach`), then the taken-over session (:meth:`follow`).
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._auth = False  # the last reply was 334: the next line is an AUTH payload
        self._content = False  # the last reply was 354: the next write is the message

    def attach(self, smtp: aiosmtplib.SMTP, greeting: aiosmtplib.SMTPResponse) -> None:
        self.replied(greeting.code, greeting.message)
        protocol = smtp.protocol
        if protocol is None:
            return
        write, read_response = protocol.write, protocol.read_response

        def tapped_write(data: bytes) -> None:
            self.sent(bytes(data))
            write(data)

        async def tapped_read(timeout: float | None = None) -> aiosmtplib.SMTPResponse:  # noqa: ASYNC109
            response = await read_response(timeout=timeout)
            self.replied(response.code, response.message)
            return response

        setattr(protocol, "write", tapped_write)  # noqa: B010 (this connection's only)
        setattr(protocol, "read_response", tapped_read)  # noqa: B010

    def follow(self, session: RelaySession) -> None:
        replies = session.transport.get_protocol()
        read = replies.read  # type: ignore[attr-defined]  # session.py's _Replies

        async def tapped_read(
            count: int, timeout: float, out: list[tuple[int, str]]  # noqa: ASYNC109
        ) -> None:
            first = len(out)
            try:
                await read(count, timeout, out)
            finally:
                for code, text in out[first:]:
                    self.replied(code, text)

        setattr(replies, "read", tapped_read)  # noqa: B010
        session.transport = cast(asyncio.Transport, _TappedTransport(session.transport, self))

    def sent(self, data: bytes) -> None:
        if self._content:
            self._content = False
            self._add("C", f"[{len(data)} bytes: the test e-mail]")
            return
        lines = data.split(b"\r\n")
        if not lines[-1]:
            lines.pop()
        for raw in lines:
            self._add("C", self._masked(raw.decode("utf-8", "replace")))

    def replied(self, code: int, text: str) -> None:
        for line in _reply_lines(code, text):
            self._add("S", line)
        self._auth = code == 334
        self._content = code == 354

    def _masked(self, line: str) -> str:
        if self._auth:
            self._auth = False
            return MASK
        verb, _, rest = line.partition(" ")
        if verb.upper() == "AUTH":
            mechanism, _, payload = rest.partition(" ")
            return f"{verb} {mechanism} {MASK}" if payload else line
        return line

    def _add(self, who: str, line: str) -> None:
        if len(self.lines) < MAX_CONVERSATION_LINES:
            self.lines.append(f"{who}: {line[:MAX_LINE]}")


class _TappedTransport:
    """A session's transport whose writes the transcript sees (everything else as is)."""

    def __init__(self, transport: asyncio.Transport, transcript: Transcript) -> None:
        self._transport = transport
        self._transcript = transcript

    def write(self, data: bytes) -> None:
        self._transcript.sent(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _reply_lines(code: int, message: str) -> list[str]:
    texts = message.splitlines() or [""]
    return [f"{code}{'-' if i < len(texts) - 1 else ' '}{text}" for i, text in enumerate(texts)]
