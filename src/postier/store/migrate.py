"""Schema migrations with Alembic, run on a connection the store already holds."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

_MIGRATIONS = Path(__file__).parent / "migrations"


def _config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(connection: Connection) -> None:
    """Bring the schema to the newest revision (a no-op when it is already there).

    On PostgreSQL several processes may start together: an advisory lock held for the
    transaction lets one migrate while the others wait, then find nothing to do."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(7312026)"))
    command.upgrade(_config(connection), "head")


def status(connection: Connection) -> tuple[str | None, str]:
    """(current revision, newest revision), for ``postier doctor``."""
    current = MigrationContext.configure(connection).get_current_revision()
    head = ScriptDirectory.from_config(_config(connection)).get_current_head()
    return current, head or ""
