"""A relay's connection slots shared by every worker (``max_connections``): one row per
slot in use, with its holder and an expiry renewed while the connection lives.

0005 created ``relay_leases`` keyed by holder, never used; it becomes keyed by slot number,
so taking a slot is one ``INSERT ... ON CONFLICT DO NOTHING`` (or the takeover of an
expired row) on both backends.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_table("relay_leases")
    op.create_table(
        "relay_leases",
        sa.Column("relay_key", sa.String(64), primary_key=True),
        sa.Column("slot", sa.Integer, primary_key=True),
        sa.Column("holder", sa.String(100), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_relay_leases_holder", "relay_leases", ["holder"])


def downgrade() -> None:
    op.drop_index("ix_relay_leases_holder", table_name="relay_leases")
    op.drop_table("relay_leases")
    op.create_table(
        "relay_leases",
        sa.Column("relay_key", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(100), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
