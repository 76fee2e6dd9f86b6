"""Sender address verification: the addresses each user confirmed (or is confirming) with a
code, the codes sent (for the resend limits), and the rule each e-mail's sender came from.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sender_addresses",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("establishment_id", sa.Integer, nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("address_key", sa.String(320), nullable=False),
        sa.Column("verified_at", sa.Float),
        sa.Column("code_hash", sa.String(64)),
        sa.Column("code_expires_at", sa.Float),
        sa.Column("failed_attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ux_sender_addresses_user", "sender_addresses",
                    ["user_id", "address_key"], unique=True)
    op.create_table(
        "sender_code_sends",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("address_key", sa.String(320), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_sender_code_sends_user", "sender_code_sends", ["user_id", "at"])
    op.add_column("messages", sa.Column("sender_rule", sa.String(24)))


def downgrade() -> None:
    op.drop_column("messages", "sender_rule")
    op.drop_table("sender_code_sends")
    op.drop_table("sender_addresses")
