"""The databases the behavioural suites run against: the embedded SQLite file and a real
PostgreSQL (127.0.0.1:5432, user postgres, trust authentication; ``POSTIER_TEST_PG`` to
change). Each test gets its own database, dropped afterwards. A missing PostgreSQL fails
the tests: it is never skipped silently."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from postier.store import create_store, database_url
from postier.store.base import Store

PG_ADMIN = os.environ.get("POSTIER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_pg_database() -> str:
    name = f"postier_test_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(
            f"PostgreSQL is needed for these tests and is not reachable at {PG_ADMIN}: {exc}. "
            "Run `make test` (it starts PostgreSQL) or set POSTIER_TEST_PG."
        ) from exc
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same behavioural test, once per storage backend."""
    if request.param == "sqlite":
        yield database_url(tmp_path)
        return
    url = create_pg_database()
    yield database_url(tmp_path, url)
    drop_pg_database(url)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """The store of ``store_url``, opened (its schema made) for the test, closed after."""
    s = create_store(store_url)
    await s.open()
    yield s
    await s.close()
