"""The delivery baseline: raw aiosmtplib, as fast as Python can hand e-mails to a relay.

It reads the queued e-mails of a (stopped) Postier data directory, envelope and stored
bytes, all into memory first, then sends them over ``--concurrency`` connections that stay
open, one ``sendmail`` (MAIL, RCPT, DATA) after another, in one asyncio process, and
prints a JSON summary. No queue, no database, no bookkeeping: the "Python ceiling" for
delivery.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sqlite3
import sys
import time
from collections.abc import Coroutine
from typing import Any

import aiosmtplib


def load_messages(db_path: str, limit: int | None) -> list[tuple[str, list[str], bytes]]:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT m.id, m.envelope_from, b.data FROM messages m "
            "JOIN message_bodies b ON b.message_id = m.id "
            "WHERE m.status = 'queued' ORDER BY m.priority, m.next_attempt_at, m.id"
            + (f" LIMIT {int(limit)}" if limit else "")
        ).fetchall()
        rcpts: dict[str, list[str]] = {}
        for mid, address in db.execute(
            "SELECT message_id, address FROM recipients ORDER BY message_id, position"
        ):
            rcpts.setdefault(mid, []).append(address)
    return [(sender, rcpts[mid], bytes(data)) for mid, sender, data in rows]


async def blast(host: str, port: int, concurrency: int,
                messages: list[tuple[str, list[str], bytes]]) -> dict[str, Any]:
    todo = iter(messages)
    sent = 0
    errors: dict[str, int] = {}

    async def connection() -> None:
        nonlocal sent
        smtp = aiosmtplib.SMTP(hostname=host, port=port, timeout=30, start_tls=False)
        await smtp.connect()
        try:
            for sender, rcpts, data in todo:
                try:
                    await smtp.sendmail(sender, rcpts, data)
                    sent += 1
                except aiosmtplib.SMTPException as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    if not smtp.is_connected:
                        await smtp.connect()
        finally:
            with contextlib.suppress(aiosmtplib.SMTPException):
                await smtp.quit()

    t0 = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return {"sent": sent, "errors": errors, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=True, help="postier.db of a stopped server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    messages = load_messages(args.db, args.limit)
    print(json.dumps({"loaded": len(messages)}), flush=True)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    coro: Coroutine[Any, Any, dict[str, Any]] = blast(args.host, args.port, args.concurrency,
                                                      messages)
    if args.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(coro)
    else:
        result = asyncio.run(coro)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps(result), flush=True)
    sys.exit(0 if result["sent"] == len(messages) else 1)


if __name__ == "__main__":
    main()
