"""The embedded store as each kind of process uses it (``SQLiteStore(url, role)``).

- Every acceptance is committed with ``synchronous=FULL``; only a delivery process of
  ``postier serve`` commits its claims and results with ``synchronous=NORMAL``.
- A server that also delivers ("all") commits on its writer thread; a server whose
  delivery is in another process ("accept") commits on the event loop; that delivery
  process ("deliver") on its writer thread while it has the lock to itself, and on the
  event loop for a while after finding another process holding it.
- Waiting for another process's write lock never blocks the event loop, and gives up with
  a clear "database locked" after the busy timeout, with nothing stored.

The other process is a real one: a Python child holding ``BEGIN IMMEDIATE`` on the file.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from postier.errors import StoreUnavailable
from postier.store import create_store
from postier.store.base import ROLES, NewMessage
from postier.store.sqlite import SQLiteStore


def _message(n: int) -> NewMessage:
    return NewMessage(
        id=f"{time.time_ns():020d}{n:012d}", establishment_id=1, user_id=1, priority=0,
        envelope_from="alice@ac-lyon.fr", header_from="Alice <alice@ac-lyon.fr>",
        message_id=f"<m{n}@test>", subject=f"Conseil de classe {n}",
        data=b"Subject: x\r\n\r\nx\r\n", recipients=["parents@example.org"])


async def _open(tmp_path: Path, role: str) -> SQLiteStore:
    store = create_store(f"sqlite+aiosqlite:///{tmp_path / 'postier.db'}", role)
    assert isinstance(store, SQLiteStore)
    await store.open()
    return store


@pytest.fixture
async def held_lock(tmp_path: Path) -> AsyncIterator[Any]:
    """Another process holding the database's write lock until told to let go."""
    procs: list[subprocess.Popen[str]] = []

    def hold() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c",
             "import sqlite3, sys\n"
             f"db = sqlite3.connect({str(tmp_path / 'postier.db')!r}, isolation_level=None)\n"
             "db.execute('BEGIN IMMEDIATE')\n"
             "print('held', flush=True)\n"
             "sys.stdin.readline()\n"
             "db.execute('ROLLBACK')\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(5)


async def _synchronous_and_thread(store: SQLiteStore) -> tuple[int, str]:
    async def job(conn: Any) -> tuple[int, str]:
        value = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar()
        return value, threading.current_thread().name

    result: tuple[int, str] = await store.write(job)
    return result


@pytest.mark.parametrize("role", ROLES)
async def test_each_role_commits_where_and_how_it_promises(tmp_path: Path, role: str) -> None:
    store = await _open(tmp_path, role)
    try:
        synchronous, thread = await _synchronous_and_thread(store)
        # PRAGMA synchronous: 2 is FULL (the WAL synced at every commit), 1 is NORMAL.
        assert synchronous == (1 if role == "deliver" else 2), (role, synchronous)
        if role == "accept":
            assert thread == threading.main_thread().name, thread
        else:
            assert thread.startswith("postier-sqlite-writer"), thread
        (stored,) = await store.enqueue([_message(1)])
        assert (await store.get_message(stored.id)) is not None
    finally:
        await store.close()


@pytest.mark.parametrize("role", ["accept", "deliver"])
async def test_waiting_for_another_process_leaves_the_loop_free(
    tmp_path: Path, held_lock: Any, role: str
) -> None:
    store = await _open(tmp_path, role)
    try:
        holder = held_lock()
        accepting = asyncio.create_task(store.enqueue([_message(2)]))
        ticks = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.4:
            await asyncio.sleep(0.01)
            ticks += 1
        # The loop went on (about 40 turns of 10 ms) while the commit waited for the lock.
        assert ticks >= 20, ticks
        assert not accepting.done(), "committed while another process held the lock"
        await asyncio.to_thread(_release, holder)
        (stored,) = await asyncio.wait_for(accepting, 5)
        assert (await store.get_message(stored.id)) is not None
    finally:
        await store.close()


@pytest.mark.parametrize("role", ROLES)
async def test_a_lock_held_too_long_is_a_clear_refusal_with_nothing_stored(
    tmp_path: Path, held_lock: Any, role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("postier.store.sqlite.BUSY_TIMEOUT_MS", 300)
    store = await _open(tmp_path, role)
    try:
        holder = held_lock()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as refused:
            await store.enqueue([_message(3)])
        assert 0.25 < time.monotonic() - t0 < 3
        assert "locked" in str(refused.value) and "nothing was accepted" in str(refused.value)
        await asyncio.to_thread(_release, holder)
        assert sum((await store.counts()).values()) == 0, "a refused e-mail was stored"
    finally:
        await store.close()


def test_an_unknown_role_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown store role 'both'"):
        create_store(f"sqlite+aiosqlite:///{tmp_path / 'postier.db'}", "both")


async def test_a_delivery_process_moves_to_the_loop_while_another_process_writes(
    tmp_path: Path, held_lock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("postier.store.sqlite.CONTENDED_FOR", 0.5)
    store = await _open(tmp_path, "deliver")
    try:
        _, alone = await _synchronous_and_thread(store)
        assert alone.startswith("postier-sqlite-writer"), alone
        holder = held_lock()
        waiting = asyncio.create_task(_synchronous_and_thread(store))
        await asyncio.sleep(0.1)
        await asyncio.to_thread(_release, holder)
        await waiting
        # Found the lock taken: the next transactions run on the loop, for a while.
        _, after = await _synchronous_and_thread(store)
        assert after == threading.main_thread().name, after
        await asyncio.sleep(0.6)
        _, later = await _synchronous_and_thread(store)
        assert later.startswith("postier-sqlite-writer"), later
    finally:
        await store.close()


async def test_a_big_batch_commits_on_the_writer_thread_and_is_stored_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    role = "accept"
    import postier.store.sqlite as sqlite_store

    committed_on: list[str] = []
    real = sqlite_store._commit_and_close

    def spy(conn: Any, tx: Any) -> None:
        committed_on.append(threading.current_thread().name)
        real(conn, tx)

    monkeypatch.setattr(sqlite_store, "_commit_and_close", spy)
    store = await _open(tmp_path, role)
    try:
        await store.enqueue([_message(1)])  # a message and a recipient: 2 rows
        # 500 messages and 500 recipients: 1,000 rows, megabytes for the disk to sync.
        stored = await store.enqueue([_message(n) for n in range(2, 502)])
        assert committed_on[0] == threading.main_thread().name, committed_on
        assert committed_on[1].startswith("postier-sqlite-writer"), committed_on
        assert (await store.counts())["queued"] == 501
        assert len({r.id for r in stored}) == 500
    finally:
        await store.close()
