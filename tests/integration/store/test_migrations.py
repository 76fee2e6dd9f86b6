"""Schema migrations: an empty database is brought to the newest revision by Alembic; one
already there is recognised without loading Alembic (about 6 MB a process, in every
process that opens the store); one left at an older revision is upgraded. Both backends.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text

from postier.store import create_store, migrate
from postier.store.sql import SQLStore


def test_the_recorded_head_is_alembics_newest_revision() -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrate._MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == migrate.HEAD, (
        "a migration was added: set migrate.HEAD to its revision")


async def _revision(store: SQLStore) -> str | None:
    async with store.write_engine.connect() as conn:
        return await conn.run_sync(migrate.current_revision)


async def test_empty_then_current_then_older_databases(store_url: str) -> None:
    store = create_store(store_url)
    assert isinstance(store, SQLStore)
    async with store.write_engine.connect() as conn:
        assert await conn.run_sync(migrate.current_revision) is None  # nothing yet
    await store.open()
    try:
        assert await _revision(store) == migrate.HEAD
        # Back one revision, as a database of the previous release would be.
        async with store.write_engine.begin() as conn:
            await conn.run_sync(
                lambda c: command.downgrade(migrate._config(c), "0007"))
        assert await _revision(store) == "0007"
    finally:
        await store.close()
    again = create_store(store_url)
    assert isinstance(again, SQLStore)
    await again.open()
    try:
        assert await _revision(again) == migrate.HEAD
        async with again.write_engine.connect() as conn:
            # 0008's relay_leases is keyed by slot.
            await conn.execute(text("SELECT slot FROM relay_leases"))
    finally:
        await again.close()


def test_opening_a_current_database_does_not_load_alembic(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'postier.db'}"
    probe = (
        "import asyncio, sys\n"
        "from postier.store import create_store\n"
        f"s = create_store({url!r})\n"
        "async def main():\n"
        "    await s.open()\n"
        "    await s.close()\n"
        "asyncio.run(main())\n"
        "print('alembic' in sys.modules)\n"
    )
    first = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           timeout=60, check=True)
    assert first.stdout.strip() == "True"  # an empty database: Alembic creates the schema
    second = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=True)
    assert second.stdout.strip() == "False"
