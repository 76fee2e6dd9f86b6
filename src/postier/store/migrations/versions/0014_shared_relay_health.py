"""What every process of an installation agrees on about a relay, beyond its limits:

- ``relay_limits.failing_since``: since when the relay keeps failing (connection, TLS,
  authentication) as any process saw it, NULL while it answers; ``recovered_at`` when a
  process (or a probe) last found it answering again after failing; ``probed_at`` when a
  process last probed it while the backup relay stood in, so that one probe serves all.
- ``relay_leases.establishment_id``: whose e-mail a connection slot was taken for, so a
  free slot goes to the establishment holding fewest.
- ``relay_waiters``: the processes waiting for one of a relay's connection slots, per
  establishment, since when, and when they last asked (a killed process's rows lapse).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("relay_limits", sa.Column("failing_since", sa.Float))
    op.add_column("relay_limits", sa.Column("recovered_at", sa.Float))
    op.add_column("relay_limits", sa.Column("probed_at", sa.Float, nullable=False,
                                            server_default=sa.text("0")))
    op.add_column("relay_leases", sa.Column("establishment_id", sa.Integer, nullable=False,
                                            server_default=sa.text("0")))
    op.create_table(
        "relay_waiters",
        sa.Column("relay_key", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(100), primary_key=True),
        sa.Column("establishment_id", sa.Integer, primary_key=True),
        sa.Column("since", sa.Float, nullable=False),
        sa.Column("seen_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("relay_waiters")
    with op.batch_alter_table("relay_leases") as batch:
        batch.drop_column("establishment_id")
    with op.batch_alter_table("relay_limits") as batch:
        batch.drop_column("probed_at")
        batch.drop_column("recovered_at")
        batch.drop_column("failing_since")
