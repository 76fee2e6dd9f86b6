"""Relay sending limits shared by every worker: pace and pause per relay, usage buckets.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "relay_limits",
        sa.Column("relay_key", sa.String(64), primary_key=True),
        sa.Column("next_start", sa.Float, nullable=False, server_default=sa.text("0")),
        sa.Column("paused_until", sa.Float, nullable=False, server_default=sa.text("0")),
        sa.Column("pause", sa.Float, nullable=False, server_default=sa.text("0")),
        sa.Column("pause_error", sa.Text),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "relay_usage",
        sa.Column("relay_key", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(1), primary_key=True),
        sa.Column("bucket", sa.Float, primary_key=True),
        sa.Column("amount", sa.Integer, nullable=False),
    )
    op.create_table(
        "relay_leases",
        sa.Column("relay_key", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(100), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("relay_leases")
    op.drop_table("relay_usage")
    op.drop_table("relay_limits")
