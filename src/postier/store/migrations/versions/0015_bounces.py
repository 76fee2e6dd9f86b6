"""Bounces and the suppression list: ``suppressions`` (the addresses an establishment no
longer sends to, one row per establishment and lower-cased address) and ``bounces`` (every
bounce or complaint received for a delivered e-mail, purged with the e-mail).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("establishment_id", sa.Integer, nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("address_key", sa.String(320), nullable=False),
        sa.Column("reason", sa.String(12), nullable=False),
        sa.Column("code", sa.Integer),
        sa.Column("status", sa.String(16), nullable=False, server_default=""),
        sa.Column("diagnostic", sa.Text, nullable=False, server_default=""),
        sa.Column("message_id", sa.String(32)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False, server_default=""),
    )
    op.create_index("ux_suppressions_address", "suppressions",
                    ["establishment_id", "address_key"], unique=True)
    op.create_table(
        "bounces",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("establishment_id", sa.Integer, nullable=False),
        sa.Column("message_id", sa.String(32), nullable=False),
        sa.Column("address_key", sa.String(320), nullable=False),
        sa.Column("kind", sa.String(12), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default=""),
        sa.Column("code", sa.Integer),
        sa.Column("diagnostic", sa.Text, nullable=False, server_default=""),
        sa.Column("received_at", sa.Float, nullable=False),
    )
    op.create_index("ix_bounces_address", "bounces",
                    ["establishment_id", "address_key", "received_at"])
    op.create_index("ix_bounces_message", "bounces", ["message_id"])


def downgrade() -> None:
    op.drop_index("ix_bounces_message", "bounces")
    op.drop_index("ix_bounces_address", "bounces")
    op.drop_table("bounces")
    op.drop_index("ux_suppressions_address", "suppressions")
    op.drop_table("suppressions")
