"""A real DNS server for tests: 127.0.0.1, an OS-chosen port, UDP and TCP, answering from
a zone held in memory.

It runs in its own threads, so sync and async tests (and subprocesses) can ask it::

    def test_x(dns_server):
        dns_server.add("clg-moulin.ac-lyon.fr", "TXT", "v=spf1 ip4:192.0.2.10 -all")
        dns_server.add("smtp.ac-lyon.fr", "A", "192.0.2.10")
        ...check_domain(..., servers=dns_server.servers)

Answers are authoritative: records of the asked type, NODATA when the name has others (or
is an empty non-terminal, such as ``_domainkey.x`` above ``sel._domainkey.x``), NXDOMAIN
otherwise. TXT values are written as text: quoted strings are kept as they are (``'"a"
"b"'`` is one record of two strings); anything else is quoted, and cut into strings of 255
characters as a DNS host does. Faults, for one name or every name:
``fail(name, "timeout")`` never answers, ``fail(name, "servfail")`` answers SERVFAIL.
``max_udp`` makes longer UDP answers truncated, so that clients retry over TCP.
``queries`` lists every question received, as ``(name, type, "udp"|"tcp")``.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest


class LocalDns:
    """The server; start it with ``with LocalDns() as server:`` (or the fixture)."""

    def __init__(self, ttl: int = 300) -> None:
        self.ttl = ttl
        self.max_udp: int | None = None
        self.queries: list[tuple[str, str, str]] = []
        self._zone: dict[dns.name.Name, dict[str, list[str]]] = {}
        self._faults: dict[dns.name.Name | None, str] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._servers: list[socketserver.BaseServer] = []
        self.port = 0

    @property
    def servers(self) -> list[tuple[str, int]]:
        """What to pass as ``servers=`` (or POSTIER_DNS_SERVERS as ``127.0.0.1:<port>``)."""
        return [("127.0.0.1", self.port)]

    def add(self, name: str, rdtype: str, *values: str) -> None:
        rdtype = rdtype.upper()
        texts = [_txt(v) if rdtype == "TXT" else v for v in values]
        with self._lock:
            self._zone.setdefault(_name(name), {}).setdefault(rdtype, []).extend(texts)

    def fail(self, name: str | None = None, how: str = "timeout") -> None:
        """Make ``name`` (every name when ``None``) time out or answer SERVFAIL."""
        assert how in ("timeout", "servfail"), how
        with self._lock:
            self._faults[_name(name) if name else None] = how

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The reply to one query, or ``None`` to stay silent."""
        try:
            query = dns.message.from_wire(wire)
            question = query.question[0]
        except (dns.exception.DNSException, IndexError):
            return None
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append((question.name.to_text(omit_final_dot=True), rdtype, transport))
            fault = self._faults.get(question.name, self._faults.get(None))
            names = self._zone.get(question.name)
            exists = names is not None or any(n.is_subdomain(question.name) for n in self._zone)
            values = list((names or {}).get(rdtype, []))
        if fault == "timeout":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if fault == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif values:
            response.answer.append(dns.rrset.from_text_list(question.name, self.ttl, "IN",
                                                            rdtype, values))
        wire = response.to_wire()
        # Measured here: dnspython's own max_size never goes below 512 bytes.
        limit = self.max_udp or (query.payload if query.edns >= 0 else 512)
        if transport == "udp" and len(wire) > limit:
            response.answer.clear()
            response.flags |= dns.flags.TC
            wire = response.to_wire()
        return wire

    def start(self) -> None:
        for _ in range(20):  # the UDP port may be taken for TCP: try another
            udp = _UdpServer(("127.0.0.1", 0), _UdpHandler)
            try:
                tcp = _TcpServer(("127.0.0.1", udp.server_address[1]), _TcpHandler)
            except OSError:
                udp.server_close()
                continue
            break
        else:
            raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")
        self.port = udp.server_address[1]
        for server in (udp, tcp):
            server.dns = self
            self._servers.append(server)
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             name=f"dns-{self.port}", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()  # releases the handlers told to time out
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> LocalDns:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text.rstrip(".") + ".")


def _txt(value: str) -> str:
    if value.startswith('"'):
        return value
    escaped = [value[i:i + 255].replace("\\", "\\\\").replace('"', '\\"')
               for i in range(0, max(len(value), 1), 255)]
    return " ".join(f'"{part}"' for part in escaped)


class _UdpServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    dns: LocalDns


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    dns: LocalDns
    allow_reuse_address = True


class _UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        dns_: LocalDns = self.server.dns  # type: ignore[attr-defined]
        reply = dns_.answer(data, "udp")
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TcpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        dns_: LocalDns = self.server.dns  # type: ignore[attr-defined]
        conn: socket.socket = self.request
        while True:
            size = _read(conn, 2)
            data = _read(conn, int.from_bytes(size, "big")) if size else b""
            if not data:
                return
            reply = dns_.answer(data, "tcp")
            if reply is None:
                dns_._stopped.wait()  # a server that never answers keeps the line open
                return
            conn.sendall(len(reply).to_bytes(2, "big") + reply)


def _read(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


@pytest.fixture
def dns_server() -> Iterator[LocalDns]:
    """A :class:`LocalDns` with an empty zone, stopped at the end of the test."""
    with LocalDns() as server:
        yield server

