"""A minimal asyncio SMTP sink, used only when Postfix's ``smtp-sink`` cannot be installed.

It accepts everything and discards it, and prints the same ``sess=.. quit=.. mesg=N``
counters as smtp-sink so that the harness reads both alike. It is Python: under load it
competes with the sender for the CPU and may be the bottleneck, which the report then says.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

counters = {"sess": 0, "quit": 0, "mesg": 0}


def _show() -> None:
    line = f"sess={counters['sess']} quit={counters['quit']} mesg={counters['mesg']}\r"
    os.write(sys.stdout.fileno(), line.encode())


class SinkProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 pysink ESMTP\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        counters["sess"] += 1
        _show()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        out = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    # Keep only what may hold the start of the terminator.
                    self.buffer = self.buffer[-4:]
                    break
                self.buffer = self.buffer[end + 5:]
                self.in_data = False
                counters["mesg"] += 1
                _show()
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                break
            line = self.buffer[:line_end]
            self.buffer = self.buffer[line_end + 2:]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(b"250-pysink\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                           b"250-SIZE 104857600\r\n250 SMTPUTF8\r\n")
            elif verb == b"DATA":
                self.in_data = True
                self.buffer = b"\r\n" + self.buffer  # a body may be empty
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                counters["quit"] += 1
                out.append(b"221 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:
                out.append(b"250 Ok\r\n")
        if out:
            self.transport.write(b"".join(out))


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, "127.0.0.1", port, backlog=1000)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    try:
        asyncio.run(main(parser.parse_args().port))
    except KeyboardInterrupt:
        pass
