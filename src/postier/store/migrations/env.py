"""Alembic environment: migrations run on a connection handed in by the store.

The store opens its own (async) engine and calls Alembic through ``run_sync`` with a
synchronous connection in ``config.attributes["connection"]``, so the same migrations run
on SQLite and PostgreSQL and no second engine or URL is needed.
"""

from __future__ import annotations

from alembic import context

from postier.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
