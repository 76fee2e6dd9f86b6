"""Sessions ended by signing out are remembered in the store, for every process and
server of the installation, until they would have expired anyway. Both backends."""

from __future__ import annotations

import time
from pathlib import Path

from postier.core.service import Postier
from postier.server.config import ServerConfig
from postier.store import schema as t


async def test_an_ended_session_stays_ended_until_it_expires(
    store_url: str, tmp_path: Path
) -> None:
    a = Postier(ServerConfig(data_dir=tmp_path, database_url=store_url))
    await a.open()
    b = Postier(ServerConfig(data_dir=tmp_path, database_url=store_url))
    await b.open()
    try:
        now = time.time()
        await a.store.end_session("old", now + 10, now)
        await a.store.end_session("today", now + 3600, now)
        await a.store.end_session("today", now + 3600, now)  # a sign-out sent twice
        assert await b.store.session_ended("today") and await b.store.session_ended("old")
        assert not await b.store.session_ended("another")
        # Once expired, a session opens nothing by itself: its row goes at the next end.
        await b.store.end_session("later", now + 7200, now + 20)
        assert not await a.store.session_ended("old")
        assert await a.store.session_ended("today") and await a.store.session_ended("later")
        rows = await a.store._read(t.ended_sessions.select())  # type: ignore[attr-defined]
        assert sorted(r.session_id for r in rows) == ["later", "today"]
    finally:
        await a.close()
        await b.close()
