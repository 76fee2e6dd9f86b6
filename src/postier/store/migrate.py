"""Schema migrations with Alembic, run on a connection the store already holds.

A database already at the newest revision is recognised without loading Alembic: every
process opens the store at start (the server, each delivery process, each CLI command),
and Alembic with its migration scripts cost about 6 MB of memory a process for nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.engine import Connection

if TYPE_CHECKING:
    from alembic.config import Config

_MIGRATIONS = Path(__file__).parent / "migrations"
# The newest revision in migrations/versions; a test holds it to Alembic's own answer, so
# a new migration without this line changed fails the tests.
HEAD = "0015"


def _config(connection: Connection) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at, None for an empty database; read without Alembic,
    and without a failing statement (which would abort a PostgreSQL transaction)."""
    if connection.dialect.name == "postgresql":
        exists = connection.execute(text("SELECT to_regclass('alembic_version')")).scalar()
    else:
        exists = connection.execute(text(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
        )).scalar()
    if exists is None:
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(connection: Connection) -> None:
    """Bring the schema to the newest revision (a no-op when it is already there).

    On PostgreSQL several processes may start together: an advisory lock held for the
    transaction lets one migrate while the others wait, then find nothing to do. A
    database already at ``HEAD`` returns at once, without loading Alembic."""
    if current_revision(connection) == HEAD:
        return
    from alembic import command

    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(7312026)"))
    command.upgrade(_config(connection), "head")


def status(connection: Connection) -> tuple[str | None, str]:
    """(current revision, newest revision), for ``postier doctor``."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    current = MigrationContext.configure(connection).get_current_revision()
    head = ScriptDirectory.from_config(_config(connection)).get_current_head()
    return current, head or ""
