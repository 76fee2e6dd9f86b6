"""The HTTP API of a hosted installation cannot be exhausted by a stranger: a body larger
than the largest legitimate request is refused (413) before it is read, from its
Content-Length or while it streams, and an API request shows a valid token before its
body is read (401). Measured on the real server process's memory (VmHWM)."""

from __future__ import annotations

import base64
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support.relay import FaultRelay
from support.server import ServerProcess

MB = 1024 * 1024


def _peak_memory(server: ServerProcess) -> int:
    """The server process's highest resident memory so far (VmHWM), in bytes."""
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def _post_raw(server: ServerProcess, head: str, body: Iterator[bytes]) -> tuple[int, bytes]:
    """Send a request head, then the body's pieces until the server answers or stops
    reading; return the status and the answer's bytes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.encode())
        for piece in body:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered before the body's end
            try:
                sock.sendall(piece)
            except OSError:
                break  # it closed the connection
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 "), f"no HTTP answer: {answer[:200]!r}"
    return int(answer[9:12]), answer


def _zeros(total: int, chunked: bool = False) -> Iterator[bytes]:
    piece = b"0" * MB
    for _ in range(total // MB):
        yield (b"100000\r\n" + piece + b"\r\n") if chunked else piece
    if chunked:
        yield b"0\r\n\r\n"


def _warm(server: ServerProcess) -> None:
    with server.client("alice") as c:
        assert c.get("/api/v1/messages").status_code == 200


def test_a_strangers_huge_body_is_refused_without_being_read(server: ServerProcess) -> None:
    _warm(server)
    before = _peak_memory(server)
    size = 300 * MB
    status, answer = _post_raw(
        server,
        "POST /api/v1/messages/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Accept-Language: fr\r\nContent-Length: {size}\r\n\r\n",
        _zeros(size),
    )
    grown = _peak_memory(server) - before
    assert status in (413, 401), answer[:300]
    assert grown < 50 * MB, f"the server grew by {grown // MB} MB for a refused body"
    assert b'"code":"request_too_large"' in answer, answer[:300]
    assert b"trop volumineuse" in answer, answer[:300]


def test_a_streamed_body_without_a_token_is_never_read(server: ServerProcess) -> None:
    _warm(server)
    before = _peak_memory(server)
    status, answer = _post_raw(
        server,
        "POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n",
        _zeros(300 * MB, chunked=True),
    )
    grown = _peak_memory(server) - before
    assert status == 401, answer[:300]
    assert grown < 50 * MB, f"the server grew by {grown // MB} MB for an anonymous body"


def test_a_streamed_body_over_the_limit_gets_413_as_it_passes_it(
    server: ServerProcess,
) -> None:
    _warm(server)
    before = _peak_memory(server)
    status, answer = _post_raw(
        server,
        "POST /api/v1/messages/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {server.tokens['alice']}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n",
        _zeros(400 * MB, chunked=True),
    )
    grown = _peak_memory(server) - before
    assert status == 413, answer[:300]
    assert b'"code":"request_too_large"' in answer, answer[:300]
    # The default limit is about 35 MB: what was read up to it, not the 400 MB sent.
    assert grown < 150 * MB, f"the server grew by {grown // MB} MB for a refused body"


def test_a_legitimate_large_batch_still_passes(server: ServerProcess,
                                               relay: FaultRelay) -> None:
    server.configure_relay(relay)
    attachment = base64.b64encode(b"%PDF" + b"\x00" * (9 * MB)).decode()
    message: dict[str, Any] = {
        "to": ["parent@example.org"], "subject": "Bulletins", "text": "Ci-joint",
        "attachments": [{"filename": "bulletin.pdf", "content_type": "application/pdf",
                         "content": attachment}],
    }
    with server.client("alice") as c:
        r = c.post("/api/v1/messages/batch", json={"messages": [message, message]},
                   timeout=60)
    assert r.status_code == 202, r.text[:500]
    assert len(r.json()["messages"]) == 2
