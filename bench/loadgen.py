"""A small HTTP/1.1 load generator: keep-alive connections sending pre-built requests.

httpx costs about as much CPU per request as the server under test, and the load generator
shares the machine's cores with it; this client only writes prepared bytes and reads the
status line, the headers and a Content-Length body, so that most of the CPU goes to the
server. Each connection is a closed loop (send, wait for the answer, send the next), as
the clients of a real installation are.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


def build_request(url: str, path: str, body: bytes, token: str | None = None) -> bytes:
    host = urlsplit(url).netloc
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Accept: application/json",
    ]
    if token:
        head.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class LoadResult:
    seconds: float  # first request sent to last answer read
    latencies: list[float] = field(default_factory=list)  # seconds, answers with the status
    errors: dict[str, int] = field(default_factory=dict)  # "HTTP 500", "timeout", ...
    sample_error: str = ""

    @property
    def ok(self) -> int:
        return len(self.latencies)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"transfer-encoding":
            raise ValueError("chunked answers are not supported by this load generator")
    return status, await reader.readexactly(length) if length else b""


async def run_load(url: str, requests: Sequence[bytes], *, concurrency: int,
                   expect: int = 202, request_timeout: float = 60.0,
                   deadline: float = 600.0) -> LoadResult:
    """Send every request once over ``concurrency`` keep-alive connections."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    next_index = 0
    result = LoadResult(seconds=0.0)

    def error(kind: str, detail: str) -> None:
        result.errors[kind] = result.errors.get(kind, 0) + 1
        if not result.sample_error:
            result.sample_error = detail[:500]

    async def client() -> None:
        nonlocal next_index
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while next_index < len(requests):
                i = next_index
                next_index += 1
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                t0 = time.perf_counter()
                try:
                    writer.write(requests[i])
                    status, body = await asyncio.wait_for(_read_response(reader), request_timeout)
                except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
                    error(type(exc).__name__, repr(exc))
                    writer.close()
                    writer = None
                    continue
                if status == expect:
                    result.latencies.append(time.perf_counter() - t0)
                else:
                    error(f"HTTP {status}", body.decode(errors="replace"))
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), deadline)
    except TimeoutError:
        error("deadline", f"the load did not finish within {deadline:.0f} s")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    result.seconds = time.perf_counter() - t0
    return result


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on uvloop when it is installed (a cheaper client), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
