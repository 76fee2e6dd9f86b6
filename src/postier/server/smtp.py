"""SMTP submission: applications, scanners and mail clients hand their e-mails to Postier.

The same guarantees as the HTTP API: an account must authenticate (AUTH PLAIN or LOGIN,
only over TLS) unless it connects from a trusted network on behalf of a named application
account; the envelope sender and the From must be the account's own; the establishment's
sender policy is applied; ``250`` is answered only once the message is durably stored.
Never an open relay: without an account nothing is accepted.

Built on aiosmtpd, which reads the data line by line up to ``<CRLF>.<CRLF>`` only, so a
bare ``<LF>.<LF>`` can never end a message early; messages holding a bare CR or LF are
refused (SMTP smuggling), and commands pipelined before a TLS handshake are discarded.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ipaddress
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    Session,
    TLSSetupException,
    syntax,
)

from postier.core import policy
from postier.core.installation import SETTINGS_TTL
from postier.core.pace import PaceExceeded, PaceTooLarge, pace_for
from postier.core.service import Postier
from postier.errors import (
    DelegationOff,
    InvalidInput,
    NotFound,
    PostierError,
    SenderForbidden,
    StoreUnavailable,
    TooLarge,
)
from postier.i18n import N_
from postier.server.smtp_tls import fingerprint, self_signed, server_tls_context
from postier.store.base import User

__all__ = ["CappedSMTP", "SubmissionConfig", "fingerprint", "parse_networks", "self_signed",
           "server_tls_context", "start_submission"]
log = logging.getLogger("postier.smtp")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# An SMTP path in its most common form, ``<dot-atom@domain>`` then the parameters: read
# with one regular expression instead of the RFC 5322 parser of the standard library,
# which aiosmtpd runs for every MAIL and RCPT (15 % of an acceptance's time). Anything
# else (quotes, routes, comments, non-ASCII) goes to aiosmtpd's parser as before.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(
    rf"\s*<((?:{_ATEXT}\.)*{_ATEXT}@(?:[A-Za-z0-9-]+\.)*[A-Za-z0-9-]+)>(?:\s+(.*))?", re.DOTALL
)


def _has_bare_cr_or_lf(raw: bytes) -> bool:
    """Whether a CR or LF stands outside a CRLF pair (every CRLF holds one of each, and
    pairs cannot overlap); three C-speed counts instead of a regular expression with
    look-arounds, ten times faster on a 2 KiB message."""
    pairs = raw.count(b"\r\n")
    return raw.count(b"\r") != pairs or raw.count(b"\n") != pairs


@dataclass
class SubmissionConfig:
    max_recipients: int = 100
    max_connections: int = 200
    max_per_client: int = 20  # connections from one address (Postfix: 50 per client)
    rate_per_minute: int = 600  # messages per account
    command_timeout: float = 60.0  # silence allowed while a command or the data is due
    # A message's whole DATA phase, however steadily its lines come (25 MB at 14 KB/s).
    data_timeout: float = 1800.0
    trusted_networks: list[Network] = field(default_factory=list)
    trusted_account: str | None = None


class _Limiter:
    """Accepted messages per account per minute (in this process: SMTP submission runs in
    one process of a server). Failed authentications are the service layer's sign-in
    throttle's (postier.core.sign_in_throttle), shared with the web pages."""

    def __init__(self, config: SubmissionConfig) -> None:
        self.config = config
        self.sent: dict[int, deque[float]] = {}

    def take(self, account: int) -> float:
        """0 when the account may send now, else seconds to wait."""
        now = time.monotonic()
        q = self.sent.setdefault(account, deque())
        while q and now - q[0] > 60:
            q.popleft()
        if len(q) >= self.config.rate_per_minute:
            return 60 - (now - q[0])
        q.append(now)
        return 0.0


class SubmissionHandler:
    """aiosmtpd handler: authentication, sender checks, durable acceptance."""

    def __init__(self, core: Postier, config: SubmissionConfig) -> None:
        self.core = core
        self.config = config
        self.limits = _Limiter(config)
        self._trusted_cache: tuple[User | None, float] | None = None
        self._trusted_addresses: dict[str, bool] = {}  # client address -> in a network

    # -- who is sending ------------------------------------------------------------------
    def _trusted(self, session: Session) -> bool:
        if not self.config.trusted_networks or not session.peer:
            return False
        return self._trusted_address(str(session.peer[0]))

    def _trusted_address(self, address: str) -> bool:
        known = self._trusted_addresses.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                known = False
            else:
                known = any(ip in net for net in self.config.trusted_networks)
            if len(self._trusted_addresses) > 10_000:
                self._trusted_addresses.clear()
            self._trusted_addresses[address] = known
        return known

    async def _account(self, session: Session) -> User | None:
        if isinstance(session.auth_data, User):
            return session.auth_data
        if self.config.trusted_account and self._trusted(session):
            return await self._trusted_user()
        return None

    async def _trusted_user(self) -> User | None:
        """The trusted networks' account, read again every SETTINGS_TTL seconds rather
        than at every MAIL and DATA (like API tokens: a change, such as disabling the
        account, counts within two seconds)."""
        now = time.monotonic()
        if self._trusted_cache is not None and now - self._trusted_cache[1] < SETTINGS_TTL:
            return self._trusted_cache[0]
        try:
            user: User | None = await self.core.find_user(self.config.trusted_account or "")
        except NotFound:
            user = None
        if user is not None and user.disabled:
            user = None
        self._trusted_cache = (user, now)
        return user

    async def _check_credentials(
        self, server: SMTP, login: bytes, password: bytes
    ) -> AuthResult:
        peer = str(server.session.peer[0]) if server.session and server.session.peer else "?"
        username = login.decode("utf-8", "replace")
        # A password or one of the account's API tokens (mail programs and copiers know
        # only a username and a password).
        signed = await self.core.sign_in("smtp", username, password.decode("utf-8", "replace"),
                                         peer, token_as_password=True)
        if signed.wait > 0:
            log.warning("AUTH refused for %r from %s: too many failures", username, peer)
            return AuthResult(
                success=False, handled=False, message="454 4.7.0 Too many failed attempts; "
                f"try again in {int(signed.wait) + 1} s",
            )
        if signed.user is None:
            log.warning("AUTH failed for %r from %s", username, peer)
            await asyncio.sleep(0.5)  # slows down guessing without holding a worker
            return AuthResult(success=False, handled=False,
                              message="535 5.7.8 Authentication credentials invalid")
        log.info("AUTH %s from %s", signed.user.username, peer)
        return AuthResult(success=True, auth_data=signed.user)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except ValueError:
                await server.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await server.push("501 5.5.2 Cannot split the credentials")
            return AuthResult(success=False, handled=True)
        return await self._check_credentials(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth("Username:")
        else:
            try:
                login = base64.b64decode(args[1].encode(), validate=True)
            except ValueError:
                await server.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        if not isinstance(login, bytes):
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check_credentials(server, login, password)

    async def handle_exception(self, error: Exception) -> str:
        """A command that failed on an error (the store unavailable at AUTH, MAIL...; or a
        bug): "try again later", never a permanent code that makes a mail client or a
        copier give up, nor the error's text, which goes to the log."""
        if isinstance(error, StoreUnavailable):
            log.warning("SMTP command not answered: %s", error)
        elif isinstance(error, TLSSetupException):
            # A client that does not trust the certificate (or speaks no common TLS
            # version) is a fact about that client, not an error of the server.
            log.info("STARTTLS refused by the client: %s", error.__cause__ or error)
            return "454 4.7.0 TLS negotiation failed"
        else:
            log.error("SMTP command failed", exc_info=error)
        return "451 4.3.0 Temporary failure; try again in a moment"

    # -- the transaction -----------------------------------------------------------------
    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        user = await self._account(session)
        if user is None:
            return "530 5.7.0 Authentication required (AUTH after STARTTLS)"
        if address in ("", "<>"):
            return "553 5.7.1 An empty sender is not accepted for submission"
        settings = await self.core.delivery_settings(user.establishment_id)
        try:
            self.core.decide_sender(user, settings, address)
        except SenderForbidden:
            return (f"553 5.7.1 <{address}>: you may send only as {user.email}"
                    " (the address of your account)")
        except PostierError as exc:
            return f"553 5.1.7 <{address}>: {exc.message('en')}"
        wait = self.limits.take(user.id)
        if wait > 0:
            return (f"451 4.7.1 Sending rate limit of {self.config.rate_per_minute} e-mails "
                    f"per minute reached; try again in {int(wait) + 1} s")
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return (f"452 4.5.3 Too many recipients: at most {self.config.max_recipients} "
                    "per message; send the rest in another message")
        try:
            normalized = policy.normalize_address(address)
        except PostierError:
            return f"553 5.1.3 <{address}>: not a valid recipient address"
        envelope.rcpt_tos.append(normalized)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        user = await self._account(session)
        if user is None or envelope.mail_from is None:
            return "530 5.7.0 Authentication required"
        raw = envelope.original_content or b""
        if _has_bare_cr_or_lf(raw):
            return ("550 5.6.0 The message contains a bare CR or LF; lines must end "
                    "with CRLF")
        smtputf8 = "SMTPUTF8" in (o.upper() for o in envelope.mail_options)
        # The same recipients-per-minute and per-day counters as the HTTP API (pace.py).
        pace, count = pace_for(self.core.store, self.core.config), len(envelope.rcpt_tos)
        taken = queued = False
        try:
            await pace.take(user, count)
            taken = True
            result = await self.core.submit_raw(
                user, envelope.mail_from, envelope.rcpt_tos, raw, smtputf8=smtputf8
            )
            queued = True
        except PaceExceeded as exc:
            return f"451 4.7.1 {exc.message('en')}"
        except PaceTooLarge as exc:
            return f"552 5.5.3 {exc.message('en')}"
        except SenderForbidden as exc:
            return f"553 5.7.1 {exc.message('en')}"
        except TooLarge as exc:
            return f"552 5.3.4 {exc.message('en')}"
        except DelegationOff as exc:
            return f"550 5.7.1 {exc.message('en')}"
        except StoreUnavailable as exc:
            log.error("submission not stored: %s", exc)
            return f"451 4.3.0 {exc.message('en')}"
        except InvalidInput as exc:
            return f"550 5.6.0 {exc.message('en')}"
        except Exception:
            log.exception("submission from %s failed", user.username)
            return "451 4.3.0 Temporary failure; nothing was stored. Try again later"
        finally:
            if taken and not queued:
                pace.give_back(user, count)
        log.info("message %s accepted over SMTP from %s for %d recipient(s)",
                 result.id, user.username, len(envelope.rcpt_tos))
        if result.sender_rule == "unverified_sender":
            # Mail programs show this reply to nobody, but logs and scripts keep it.
            return (f"250 2.0.0 OK queued as {result.id}; sender address not verified: the "
                    "establishment's sender is used (verify it in My account)")
        return f"250 2.0.0 OK queued as {result.id}"


class _QuietSession(Session):
    """aiosmtpd's session without its deprecation warning at every successful AUTH (it
    sets the legacy ``login_data`` itself; Postier reads ``auth_data`` only)."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class CappedSMTP(SMTP):
    """aiosmtpd's protocol with caps on simultaneous connections, in all and per client
    address (so one client holding idle connections cannot lock every other out); each
    door is a subclass with counters of its own."""

    active = 0
    per_client: ClassVar[collections.Counter[str]] = collections.Counter()

    def __init__(self, *args: Any, max_connections: int, max_per_client: int,
                 data_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_connections = max_connections
        # Like Postfix (50 of 100): one client never holds more than half of the slots.
        self._max_per_client = max(1, min(max_per_client, max_connections // 2))
        self._counted: str | None = None
        self._data_timeout = data_timeout
        self._data_deadline: float | None = None  # set while a message's data comes in
        self._last_input = 0.0

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    # aiosmtpd arms its timeout once per command, so a long DATA phase would be cut
    # however steadily its lines come (a large attachment over a slow link). During DATA,
    # the timeout counts from the last bytes received instead, within a deadline for the
    # whole message; elsewhere (idle, or dribbling a command that never ends) it is left
    # as it is.
    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        m = _SIMPLE_PATH.fullmatch(arg)
        if m is None:
            return super()._getaddr(arg)
        address = m.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, m.group(2) or ""

    def data_received(self, data: bytes) -> None:
        self._last_input = self.loop.time()
        super().data_received(data)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        self._data_deadline = self.loop.time() + self._data_timeout
        try:
            if hasattr(self._reader, "_limit"):
                await self._data(arg)
            else:  # an asyncio whose StreamReader differs: aiosmtpd's line-by-line loop
                await super().smtp_DATA(arg)
        finally:
            self._data_deadline = None

    async def _data(self, arg: str) -> None:
        """aiosmtpd's DATA, with the message read in a few large pieces instead of line by
        line: a 2 KiB e-mail was about 40 awaits, a tenth of an acceptance. The replies
        and limits are aiosmtpd's."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content, problem = await self._content()
        except asyncio.CancelledError:
            log.info("Connection lost during DATA")
            self._writer.close()
            raise
        if problem is not None:
            await self.push(problem)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _content(self) -> tuple[bytes, str | None]:
        """The message up to the line holding a single dot, un-stuffed; or the reply that
        refuses it (too big, a line too long) once all of it has been read."""
        reader = self._reader
        line_limit = reader._limit  # type: ignore[attr-defined]
        size_limit = self.data_size_limit
        parts: list[bytes] = []
        size = 0
        too_big = False
        # A piece ends at the next ".\r\n": the end of the message when that dot starts
        # a line. One piece may be as long as the whole message is allowed to be.
        reader._limit = (size_limit or 2**31) + 8  # type: ignore[attr-defined]
        try:
            while True:
                try:
                    piece = await reader.readuntil(b".\r\n")
                except asyncio.LimitOverrunError:
                    reader._limit = line_limit  # type: ignore[attr-defined]
                    await self._discard_to_end(reader)
                    return b"", "552 Error: Too much mail data"
                size += len(piece)
                end = piece == b".\r\n" or piece.endswith(b"\r\n.\r\n")
                if size_limit and size - 3 * end > size_limit:
                    too_big = True
                    parts.clear()  # read to the end, keep nothing
                if not too_big:
                    parts.append(piece[:-3] if end else piece)
                if end:
                    break
        finally:
            reader._limit = line_limit  # type: ignore[attr-defined]
        if too_big:
            return b"", "552 Error: Too much mail data"
        content = b"".join(parts)
        longest = self.line_length_limit - 2  # without its CRLF
        if len(content) > longest and max(map(len, content.split(b"\r\n"))) > longest:
            return b"", "500 Line too long (see RFC5321 4.5.3.1.6)"
        if content.startswith(b".") or b"\r\n." in content:
            content = (b"\r\n" + content).replace(b"\r\n.", b"\r\n")[2:]
        return content, None

    @staticmethod
    async def _discard_to_end(reader: asyncio.StreamReader) -> None:
        """Read and drop lines up to the one holding a single dot (at line start)."""
        in_line = False
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                await reader.readexactly(exc.consumed)
                in_line = True
                continue
            if line == b".\r\n" and not in_line:
                return
            in_line = False

    def _timeout_cb(self) -> None:
        now = self.loop.time()
        if self._data_deadline is not None and now < self._data_deadline:
            silent_until = self._last_input + self._timeout_duration
            if now < silent_until:
                self._reset_timeout(max(0.01, min(silent_until, self._data_deadline) - now))
                return
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._counted is None:
            peer = transport.get_extra_info("peername")
            client = str(peer[0]) if peer else "?"
            if (type(self).active >= self._max_connections
                    or type(self).per_client[client] >= self._max_per_client):
                if isinstance(transport, asyncio.WriteTransport):
                    transport.write(b"421 4.7.0 Too many connections; try again later\r\n")
                transport.close()
                return
            cls = type(self)
            cls.active += 1
            cls.per_client[client] += 1
            self._counted = client
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted is not None:
            cls = type(self)
            cls.active -= 1
            cls.per_client[self._counted] -= 1
            if cls.per_client[self._counted] <= 0:
                del cls.per_client[self._counted]
            self._counted = None
        super().connection_lost(exc)


async def start_submission(
    core: Postier,
    *,
    host: str,
    port: int,
    implicit_tls: bool,
    tls: ssl.SSLContext,
    config: SubmissionConfig,
) -> asyncio.Server:
    handler = SubmissionHandler(core, config)

    def protocol() -> SMTP:
        return CappedSMTP(
            handler,
            max_connections=config.max_connections,
            max_per_client=config.max_per_client,
            data_timeout=config.data_timeout,
            hostname=core.config.hostname,
            data_size_limit=core.config.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=None if implicit_tls else tls,
            # STARTTLS is offered, not imposed: AUTH is only offered over TLS, and without
            # an account (or a trusted network) MAIL is refused, so nothing is relayed.
            require_starttls=False,
            # On the implicit-TLS port the whole connection is encrypted already.
            auth_require_tls=not implicit_tls,
            auth_required=False,  # enforced at MAIL, so trusted networks can submit
            timeout=config.command_timeout,
            auth_exclude_mechanism=["CRAM-MD5"],
        )

    return await asyncio.get_running_loop().create_server(
        protocol, host, port, ssl=tls if implicit_tls else None
    )


def parse_networks(values: Sequence[str]) -> list[Network]:
    out: list[Network] = []
    for v in values:
        for part in v.split(","):
            if part.strip():
                try:
                    out.append(ipaddress.ip_network(part.strip(), strict=False))
                except ValueError as exc:
                    raise InvalidInput(
                        N_("{network!r} is not a network: write it as 192.168.1.0/24."),
                        field="smtp_trusted_networks", network=part.strip(),
                    ) from exc
    return out
