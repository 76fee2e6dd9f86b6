"""Baselines for the acceptance scenarios: the least a FastAPI/uvicorn server can do.

* ``ceiling``: answers 202 with an id and never looks at the e-mail (the single route does
  not even parse the JSON; the batch route parses it only to count the messages). No
  framework-based server in this venv can accept faster: the HTTP ceiling.
* ``sqlite``: the naive durable design: parse the JSON, INSERT the message, COMMIT (WAL,
  ``synchronous=FULL`` like Postier), one transaction per request, synchronously in the
  event loop. No authentication, no validation, no sender policy, no MIME rendering.

Run as ``python bench/baseline_app.py --mode ceiling --port 8080`` (uvicorn's defaults:
uvloop and httptools when installed; ``--loop asyncio`` for the standard event loop).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sqlite3
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

_ACCEPTED = b'{"status":"queued","duplicate":false,"id":"'


def _id() -> str:
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def create_app(mode: str, db_path: str | None) -> FastAPI:
    app = FastAPI()
    db: sqlite3.Connection | None = None
    if mode == "sqlite":
        assert db_path, "--db is required with --mode sqlite"
        db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS messages (id TEXT PRIMARY KEY, recipients TEXT NOT NULL,"
            " subject TEXT NOT NULL, body TEXT NOT NULL, created_at REAL NOT NULL)"
        )

    def store(messages: list[dict[str, Any]]) -> list[str]:
        assert db is not None
        ids = [_id() for _ in messages]
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO messages VALUES (?, ?, ?, ?, ?)",
            [(i, json.dumps(m.get("to", [])), m.get("subject", ""), m.get("text", ""), now)
             for i, m in zip(ids, messages, strict=True)],
        )
        db.execute("COMMIT")
        return ids

    @app.get("/api/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/v1/messages")
    async def submit(request: Request) -> Response:
        body = await request.body()
        if db is None:
            msg_id = _id()
        else:
            (msg_id,) = store([json.loads(body)])
        return Response(_ACCEPTED + msg_id.encode() + b'"}', status_code=202,
                        media_type="application/json")

    @app.post("/api/v1/messages/batch")
    async def submit_batch(request: Request) -> JSONResponse:
        messages = json.loads(await request.body())["messages"]
        ids = [_id() for _ in messages] if db is None else store(messages)
        return JSONResponse(
            {"messages": [{"id": i, "status": "queued", "duplicate": False} for i in ids]},
            status_code=202,
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["ceiling", "sqlite"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", help="SQLite file (mode sqlite)")
    parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    args = parser.parse_args()
    uvicorn.run(create_app(args.mode, args.db), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False, loop=args.loop)


if __name__ == "__main__":
    main()
