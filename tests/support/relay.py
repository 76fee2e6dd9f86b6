"""A real, programmable SMTP relay for integration tests.

``FaultRelay`` listens on ``127.0.0.1`` (OS-chosen port) and runs aiosmtpd in its
own thread with its own event loop, so the code under test can live in the pytest
event loop, in another thread or in a subprocess (``postier serve``).

It records every accepted message and can be told, at any time and from any
thread, to misbehave::

    with FaultRelay() as relay:
        relay.rcpt_replies["bad@x.fr"] = "550 5.1.1 No such user"
        relay.stall = ("data", 5.0)
        ...                                  # run the code under test
        [msg] = relay.wait_for(1)
        relay.reset_faults()

Fault attributes (all reset by :meth:`FaultRelay.reset_faults`):

``greeting_reply``
    e.g. ``"421 4.3.2 Service not available"``: sent instead of the 220 greeting,
    then the connection is closed.
``mail_reply`` / ``refuse_senders``
    reply to every ``MAIL FROM`` / refuse only these senders with
    ``553 5.7.1 Sender address rejected``.
``rcpt_replies`` / ``rcpt_reply_default``
    reply per recipient address (case-insensitive) / for every other recipient.
``data_reply``
    reply after the final dot. A non-2xx reply means the message is NOT recorded.
``stall``
    ``(step, seconds)``: at ``step`` wait ``seconds`` before going on normally.
    Steps: ``connect`` (TCP accepted, nothing said), ``ehlo`` (EHLO/HELO),
    ``mail``, ``rcpt``, ``data`` (after the DATA command, before 354),
    ``after_data`` (after the final dot, before the reply), ``quit`` (before the 221).
``drop_during_data``
    answer 354, read part of the message, then abort the connection.
``pipelining``
    advertise PIPELINING (RFC 2920) in the EHLO reply, as Postfix, Exchange and Gmail
    do (default ``True``); ``False`` makes clients send one command at a time.
``fail_tls_handshake``
    abort the TLS handshake (implicit TLS on connect, or after ``220`` to STARTTLS);
    the client gets an ``ssl.SSLError`` (asyncio drops the connection, so usually
    ``UNEXPECTED_EOF_WHILE_READING`` rather than the alert).

Any 2xx reply given through ``mail_reply``/``rcpt_replies``/``data_reply`` is
sent verbatim and the command is accepted normally.

``connections`` counts the connections accepted, ``sessions`` those open now and
``max_sessions`` the most open at the same time so far.

:meth:`FaultRelay.down` stops listening (connections are refused, established
ones are aborted); :meth:`FaultRelay.up` listens again on the same port.

From an ``async`` test whose event loop runs the code under test, wait with
``await relay.wait_for_async(n)``, not the blocking ``relay.wait_for(n)``.
Unexpected exceptions inside the relay are collected in ``relay.errors``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import errno
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal, cast

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException

from .certs import default_cert_dir, make_self_signed

TLSMode = Literal["none", "starttls", "implicit"]
StallStep = Literal["connect", "ehlo", "mail", "rcpt", "data", "after_data"]
STALL_STEPS: frozenset[str] = frozenset(
    {"connect", "ehlo", "mail", "rcpt", "data", "after_data", "quit"})

HOST = "127.0.0.1"
DATA_SIZE_LIMIT = 50 * 1024 * 1024
SENDER_REFUSED_REPLY = "553 5.7.1 Sender address rejected"

_FAULT_DEFAULTS: dict[str, Any] = {
    "greeting_reply": None,
    "mail_reply": None,
    "refuse_senders": set,
    "rcpt_replies": dict,
    "rcpt_reply_default": None,
    "data_reply": None,
    "_stall": None,
    "drop_during_data": False,
    "fail_tls_handshake": False,
    "pipelining": True,
}


@dataclass(frozen=True)
class Received:
    """One message the relay accepted (``rcpt_tos`` holds only accepted recipients)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: Any
    auth_user: str | None
    at: float
    mail_options: list[str] = field(default_factory=list)
    rcpt_options: list[str] = field(default_factory=list)
    tls: bool = False
    helo: str | None = None

    @property
    def message(self) -> EmailMessage:
        """``data`` parsed with the modern e-mail policy."""
        return cast(EmailMessage, email.message_from_bytes(self.data, policy=email.policy.default))

    def __repr__(self) -> str:
        subject = self.message.get("Subject")
        return (
            f"Received(from={self.mail_from!r}, to={self.rcpt_tos!r}, subject={subject!r}, "
            f"{len(self.data)} bytes, auth_user={self.auth_user!r}, tls={self.tls})"
        )


def _is_positive(reply: str) -> bool:
    return reply.lstrip().startswith("2")


class _Handler:
    """aiosmtpd handler hooks: replies, ``after_data`` stall and recording."""

    def __init__(self, relay: FaultRelay) -> None:
        self.relay = relay

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.relay.auth is None:
            # No credentials configured: don't tempt clients into AUTH.
            responses = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        if self.relay.pipelining:
            # aiosmtpd reads pipelined commands correctly but does not say so.
            responses = [f"250-{r[4:]}" for r in responses] + ["250 PIPELINING"]
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        relay = self.relay
        refused = {s.lower() for s in set(relay.refuse_senders)}  # copy: atomic under the GIL
        reply = relay.mail_reply
        if address.lower() in refused:
            return SENDER_REFUSED_REPLY
        if reply is not None and not _is_positive(reply):
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return reply or "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        relay = self.relay
        replies = {k.lower(): v for k, v in dict(relay.rcpt_replies).items()}
        reply = replies.get(address.lower(), relay.rcpt_reply_default)
        if reply is not None and not _is_positive(reply):
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return reply or "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        relay = self.relay
        await relay._stall_at("after_data")
        reply = relay.data_reply
        if reply is not None and not _is_positive(reply):
            return reply
        content = envelope.original_content
        assert isinstance(content, bytes)
        auth_user = session.auth_data if isinstance(session.auth_data, str) else None
        relay._record(
            Received(
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                data=bytes(content),
                peer=session.peer,
                auth_user=auth_user,
                at=time.time(),
                mail_options=list(envelope.mail_options),
                rcpt_options=list(envelope.rcpt_options),
                tls=session.ssl is not None or relay.tls == "implicit",
                helo=session.host_name,
            )
        )
        return reply or "250 2.0.0 OK queued"

    async def handle_exception(self, error: Exception) -> str:
        if not isinstance(error, TLSSetupException | ConnectionError):
            self.relay.errors.append(f"{type(error).__name__}: {error}")
        return "451 4.3.0 Test relay internal error"


def _authenticator(relay: FaultRelay) -> Any:
    def authenticate(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        users = relay.auth or {}
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "surrogateescape")
            password = auth_data.password.decode("utf-8", "surrogateescape")
            if user in users and users[user] == password:
                return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)

    return authenticate


class _Session(Session):
    """aiosmtpd sets the deprecated ``login_data`` on every AUTH, logging a warning; mute it."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _FaultSMTP(SMTP):
    """aiosmtpd ``SMTP`` protocol with connection-level faults."""

    def __init__(self, relay: FaultRelay, loop: asyncio.AbstractEventLoop) -> None:
        self._relay = relay
        super().__init__(
            _Handler(relay),
            data_size_limit=DATA_SIZE_LIMIT,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=relay.hostname,
            ident="FaultRelay",
            tls_context=relay._ssl_context if relay.tls == "starttls" else None,
            require_starttls=relay.tls == "starttls" and relay.require_starttls,
            auth_require_tls=False,
            authenticator=_authenticator(relay),
            loop=loop,
        )
        # Set after __init__ to avoid aiosmtpd's "AUTH without TLS" warning,
        # which would be emitted from this thread on every connection.
        self._auth_required = relay.auth is not None

    def _create_session(self) -> Session:
        return _Session(self.loop)

    async def auth_XOAUTH2(self, _: Any, args: list[str]) -> AuthResult:
        """XOAUTH2 (RFC 7628 style, as Microsoft 365 and Google speak it): the client sends
        user=...^Aauth=Bearer TOKEN^A^A; accepted when the token is in relay.oauth_tokens."""
        blob = base64.b64decode(args[1]) if len(args) > 1 else b""
        fields = dict(
            part.split("=", 1) for part in blob.decode("utf-8", "replace").split("\x01")
            if "=" in part
        )
        user = fields.get("user", "")
        token = fields.get("auth", "").removeprefix("Bearer ")
        if self._relay.oauth_tokens.get(user) == token:
            return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False,
                          message="535 5.7.3 Authentication unsuccessful")

    # -- connection tracking (so down()/stop() can abort live sessions) --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:
            relay = self._relay
            relay._live.add(self)
            relay.max_sessions = max(relay.max_sessions, len(relay._live))
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._relay._live.discard(self)
        super().connection_lost(error)

    def _abort(self) -> None:
        for transport in (self.transport, self._original_transport):
            if transport is not None:
                cast(asyncio.Transport, transport).abort()

    async def _abort_and_wait(self) -> None:
        self._abort()
        # connection_lost() cancels the handler task, which ends this wait.
        await self.loop.create_future()

    # -- faults --

    async def _handle_client(self) -> None:
        relay = self._relay
        await relay._stall_at("connect")
        greeting = relay.greeting_reply
        if greeting is not None:
            await self.push(greeting)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    async def smtp_EHLO(self, hostname: str) -> None:
        await self._relay._stall_at("ehlo")
        await super().smtp_EHLO(hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        await self._relay._stall_at("ehlo")
        await super().smtp_HELO(hostname)

    async def smtp_MAIL(self, arg: str | None) -> None:
        await self._relay._stall_at("mail")
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        await self._relay._stall_at("rcpt")
        await super().smtp_RCPT(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        await self._relay._stall_at("quit")
        await super().smtp_QUIT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        relay = self._relay
        await relay._stall_at("data")
        assert self.envelope is not None
        if relay.drop_during_data and self.envelope.rcpt_tos and not arg:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            await self._reader.readuntil(b"\r\n")  # some of the message has arrived...
            await self._abort_and_wait()  # ...and the line goes dead.
            return
        await super().smtp_DATA(arg)


class FaultRelay:
    """Programmable SMTP relay on 127.0.0.1 running in its own thread and event loop."""

    host: str = HOST

    def __init__(
        self,
        *,
        tls: TLSMode = "none",
        auth: dict[str, str] | None = None,
        hostname: str = "localhost",
        cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        require_starttls: bool = True,
        port: int = 0,
    ) -> None:
        """
        :param tls: ``"none"``, ``"starttls"`` (STARTTLS offered and, unless
            ``require_starttls=False``, required before MAIL/AUTH) or ``"implicit"``
            (TLS from the first byte, "SMTPS").
        :param auth: username -> password. When set, AUTH PLAIN/LOGIN is required
            before MAIL (530 otherwise, 535 on bad credentials); allowed without TLS.
        :param cert: ``(cert_path, key_path)``; default: the session's self-signed
            certificate for localhost/127.0.0.1.
        """
        if tls not in ("none", "starttls", "implicit"):
            raise ValueError(f"tls must be 'none', 'starttls' or 'implicit', not {tls!r}")
        self.tls: TLSMode = tls
        self.auth = dict(auth) if auth is not None else None
        # username -> access token accepted by AUTH XOAUTH2
        self.oauth_tokens: dict[str, str] = {}
        self.hostname = hostname
        self.require_starttls = require_starttls
        cert_path, key_path = cert if cert is not None else make_self_signed(default_cert_dir())
        self.cert_path = Path(cert_path)
        self.key_path = Path(key_path)
        self.port = port
        self.connections = 0
        # The most connections open at the same time so far (see ``sessions``).
        self.max_sessions = 0
        self.errors: list[str] = []
        # Fault attributes; see the module docstring.
        self.greeting_reply: str | None
        self.mail_reply: str | None
        self.refuse_senders: set[str]
        self.rcpt_replies: dict[str, str]
        self.rcpt_reply_default: str | None
        self.data_reply: str | None
        self._stall: tuple[str, float] | None
        self.drop_during_data: bool
        self.fail_tls_handshake: bool
        self.pipelining: bool
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)
        self._messages: list[Received] = []
        self.reset_faults()

        self._ssl_context = self._make_server_ssl_context()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._live: set[_FaultSMTP] = set()

    # ----------------------------------------------------------------- faults

    def reset_faults(self) -> None:
        """Back to a well-behaved relay (messages are kept; see :meth:`clear`)."""
        with self._lock:
            for name, default in _FAULT_DEFAULTS.items():
                setattr(self, name, default() if callable(default) else default)

    @property
    def stall(self) -> tuple[str, float] | None:
        return self._stall

    @stall.setter
    def stall(self, value: tuple[str, float] | None) -> None:
        if value is not None:
            step, seconds = value
            if step not in STALL_STEPS:
                raise ValueError(f"unknown stall step {step!r}; use one of {sorted(STALL_STEPS)}")
            value = (step, float(seconds))
        self._stall = value

    async def _stall_at(self, step: str) -> None:
        stall = self._stall
        if stall is not None and stall[0] == step:
            await asyncio.sleep(stall[1])

    # --------------------------------------------------------------- messages

    @property
    def messages(self) -> list[Received]:
        """Snapshot of the messages received so far, oldest first."""
        with self._lock:
            return list(self._messages)

    def clear(self) -> None:
        """Forget received messages and reset the connection counters."""
        with self._lock:
            self._messages.clear()
            self.connections = 0
            self.max_sessions = len(self._live)

    @property
    def sessions(self) -> int:
        """Connections open right now (``max_sessions``: the most at any one time)."""
        return len(self._live)

    def _record(self, received: Received) -> None:
        with self._arrived:
            self._messages.append(received)
            self._arrived.notify_all()

    def wait_for(self, n: int, timeout: float = 10) -> list[Received]:
        """Block until at least ``n`` messages were received; return them all.

        Do not call this from the event loop running the code under test (it would
        block it); use :meth:`wait_for_async` there.
        """
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self._messages) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(self._describe_shortfall(n, timeout))
                self._arrived.wait(remaining)
            return list(self._messages)

    async def wait_for_async(self, n: int, timeout: float = 10) -> list[Received]:  # noqa: ASYNC109
        """:meth:`wait_for` for async tests: polls without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self._messages) >= n:
                    return list(self._messages)
            if time.monotonic() >= deadline:
                raise AssertionError(self._describe_shortfall(n, timeout))
            await asyncio.sleep(0.01)

    def _describe_shortfall(self, n: int, timeout: float) -> str:
        with self._lock:
            got = list(self._messages)
        lines = [
            f"FaultRelay :{self.port}: expected {n} message(s) within {timeout}s, "
            f"got {len(got)} ({self.connections} connection(s), faults: {self._active_faults()})"
        ]
        lines += [f"  #{i}: {m!r}" for i, m in enumerate(got, 1)]
        if self.errors:
            lines.append(f"  relay errors: {self.errors}")
        return "\n".join(lines)

    def _active_faults(self) -> str:
        active = {
            name.lstrip("_"): getattr(self, name)
            for name, default in _FAULT_DEFAULTS.items()
            if getattr(self, name) != (default() if callable(default) else default)
        }
        return repr(active) if active else "none"

    # -------------------------------------------------------------- lifecycle

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts (only) this relay's certificate."""
        return ssl.create_default_context(cafile=str(self.cert_path))

    def start(self) -> FaultRelay:
        if self._thread is not None:
            raise RuntimeError("FaultRelay already started")
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._loop_exception)
        self._loop = loop
        self._thread = threading.Thread(target=self._run_loop, name="FaultRelay", daemon=True)
        self._thread.start()
        try:
            self._call(self._listen())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop listening, abort live connections, stop the thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    def down(self) -> None:
        """Stop listening (new connections are refused) and abort live connections."""
        self._call(self._close_server(abort_live=True))

    def up(self) -> None:
        """Listen again on the same port (no-op if already up)."""
        self._call(self._listen())

    def __enter__(self) -> FaultRelay:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "up" if self.is_up else "down"
        return f"<FaultRelay {self.host}:{self.port} tls={self.tls} {state}>"

    # ------------------------------------------------------- loop-thread side

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        if self._loop is None:
            coro.close()
            raise RuntimeError("FaultRelay is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._cancel_remaining_tasks()

    def _cancel_remaining_tasks(self) -> None:
        loop = self._loop
        assert loop is not None
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ssl.SSLError | ConnectionError) or (
            isinstance(exc, OSError) and exc.errno in (errno.EPIPE, errno.ECONNRESET)
        ):
            return
        self.errors.append(f"{context.get('message')}: {exc!r}")

    def _make_server_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_path, self.key_path)

        def on_client_hello(sslobj: Any, server_name: str | None, context: Any) -> int | None:
            # Called for every handshake (with or without SNI).
            if self.fail_tls_handshake:
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
            return None

        ctx.sni_callback = on_client_hello
        return ctx

    def _protocol_factory(self) -> _FaultSMTP:
        self.connections += 1
        assert self._loop is not None
        return _FaultSMTP(self, self._loop)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        # IPPROTO_TCP, not 0: asyncio then sets TCP_NODELAY on the accepted connections,
        # so replies to pipelined commands leave at once, as real relays send them (they
        # flush a group's replies together). With Nagle's algorithm on, each later reply
        # of a group would wait for the client's delayed ACK: 40 ms an e-mail.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        assert self._loop is not None
        self._server = await self._loop.create_server(
            self._protocol_factory,
            sock=sock,
            ssl=self._ssl_context if self.tls == "implicit" else None,
        )
        self.port = sock.getsockname()[1]

    async def _close_server(self, *, abort_live: bool) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if abort_live:
            for proto in list(self._live):
                proto._abort()
        if server is not None:
            await server.wait_closed()
        # Let connection_lost() callbacks run.
        await asyncio.sleep(0)

    async def _shutdown(self) -> None:
        await self._close_server(abort_live=True)


# ------------------------------------------------------------------ helpers


@contextlib.contextmanager
def blackhole_port() -> Iterator[int]:
    """A port on 127.0.0.1 that completes TCP handshakes but never says anything.

    Connections are accepted by the kernel (listen backlog) and left unanswered;
    they are reset when the context exits.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, 0))
        sock.listen(128)
        yield sock.getsockname()[1]
    finally:
        sock.close()


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])
