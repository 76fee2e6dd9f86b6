"""Opening a connection to a relay: resolve, connect, greeting, EHLO, TLS, authentication.

Delivery (through the relay pool) and the test-send open their connections here; the
test-send watches each step through ``on_step`` (:mod:`postier.delivery.steps`). Every
failure becomes a :class:`~postier.errors.DeliveryError` explained by
:func:`~postier.delivery.classify.classify`. :func:`open_session` then hands the
connection to :class:`~postier.delivery.session.RelaySession`, which sends the e-mails.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import aiosmtplib

from postier.core.settings import AuthMethod, RelaySettings, Security
from postier.delivery import oauth2
from postier.delivery.classify import classify, failure
from postier.delivery.session import RelaySession
from postier.delivery.steps import ConnectionSteps, StepCallback
from postier.delivery.tls import tls_context

ConnectCallback = Callable[[aiosmtplib.SMTP, aiosmtplib.SMTPResponse], None]


async def open_smtp(
    relay: RelaySettings,
    *,
    local_hostname: str | None = None,
    on_step: StepCallback | None = None,
    on_connect: ConnectCallback | None = None,
) -> aiosmtplib.SMTP:
    """Connect, greet, secure and authenticate, step by step; return a ready connection.
    ``on_connect`` sees the connection and its greeting before EHLO (the test-send
    records the conversation from there)."""
    if not relay.configured:
        raise failure("not_configured", "resolve")
    steps = ConnectionSteps(relay, on_step)
    loop = asyncio.get_running_loop()
    timeout = float(relay.timeout)
    async with steps.step("resolve") as d:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(relay.host, relay.port, type=socket.SOCK_STREAM), timeout
        )
        family, _, proto, _, address = infos[0]
        d.append(f"{address[0]!s}")
    sock = _socket(family, proto)
    try:
        async with steps.step("connect") as d:
            await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
            d.append(f"{address[0]!s}:{address[1]!s}")
        smtp = _client(relay, sock, local_hostname, timeout)
        async with steps.step("tls" if relay.security == Security.TLS else "greeting") as d:
            greeting = await smtp.connect()
            d.append(f"{greeting.code} {greeting.message}")
            if on_connect is not None:
                on_connect(smtp, greeting)
    except BaseException:
        sock.close()
        raise
    try:
        async with steps.step("ehlo") as d:
            ehlo = await smtp.ehlo()
            d.append(f"{ehlo.code} {ehlo.message.splitlines()[0] if ehlo.message else ''}")
        if relay.security == Security.STARTTLS:
            async with steps.step("tls") as d:
                if not smtp.supports_extension("starttls"):
                    # Never fall back to clear text: the administrator asked for TLS.
                    raise aiosmtplib.SMTPNotSupported("STARTTLS not advertised")
                resp = await smtp.starttls()
                d.append(f"{resp.code} {resp.message}")
                await smtp.ehlo()
        if relay.auth == AuthMethod.PASSWORD:
            async with steps.step("auth") as d:
                resp = await smtp.login(relay.username, relay.password or "")
                d.append(f"{resp.code} {resp.message}")
        elif relay.auth == AuthMethod.OAUTH2:
            async with steps.step("auth") as d:
                token = await oauth2.access_token(relay)
                try:
                    resp = await smtp.auth_xoauth2(relay.username, token)
                except aiosmtplib.SMTPAuthenticationError:
                    oauth2.forget(relay)
                    raise
                d.append(f"{resp.code} {resp.message}")
    except BaseException:
        smtp.close()
        raise
    return smtp


def _socket(family: int, proto: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.setblocking(False)
    # Each command group and each message is one write: send it at once, never held back
    # by Nagle's algorithm waiting for an ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _client(relay: RelaySettings, sock: socket.socket, local_hostname: str | None,
            timeout: float) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname=relay.host,
        local_hostname=local_hostname,
        timeout=timeout,
        use_tls=relay.security == Security.TLS,
        start_tls=False,
        # Building a context reads the system's certificates (costly in CPU): only for a
        # connection that will use TLS.
        tls_context=None if relay.security == Security.NONE else tls_context(relay),
        sock=sock,
    )


async def open_session(
    relay: RelaySettings,
    *,
    local_hostname: str | None = None,
    on_step: StepCallback | None = None,
    on_connect: ConnectCallback | None = None,
) -> RelaySession:
    """:func:`open_smtp`, then the connection taken over for sending e-mails
    (:func:`postier.delivery.transaction.send_on`)."""
    smtp = await open_smtp(relay, local_hostname=local_hostname, on_step=on_step,
                           on_connect=on_connect)
    try:
        return RelaySession.take_over(smtp, float(relay.timeout), pipelining=relay.pipelining)
    except Exception as exc:
        smtp.close()
        raise classify(exc, "ehlo", relay) from exc
