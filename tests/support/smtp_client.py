"""A raw SMTP client's one helper: read one whole reply, for tests that speak SMTP byte by
byte (smuggling, injection, oversized lines) where smtplib would tidy the input."""

from __future__ import annotations

import socket


def read_reply(s: socket.socket) -> bytes:
    """One whole SMTP reply (its last line is "NNN text"), or what came before EOF."""
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return buf
        buf += chunk
        lines = buf.split(b"\r\n")
        if len(lines) >= 2 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return buf
