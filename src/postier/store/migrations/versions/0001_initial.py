"""Initial schema: establishments, users, tokens, settings, the queue.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_DUE = "status IN ('queued', 'deferred')"
_SENDING = "status = 'sending'"


def upgrade() -> None:
    est = op.create_table(
        "establishments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("slug", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("hosted", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "establishment_id", sa.Integer, sa.ForeignKey("establishments.id"), nullable=False
        ),
        sa.Column("username", sa.String(100), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False, server_default=""),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("password_hash", sa.String(200)),
        sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("granted_senders", sa.Text, nullable=False, server_default="[]"),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ux_users_username", "users", ["establishment_id", "username"], unique=True)
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("name", sa.String(100), nullable=False, server_default=""),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_used_at", sa.Float),
        sa.Column("revoked_at", sa.Float),
    )
    op.create_table(
        "settings",
        sa.Column(
            "establishment_id", sa.Integer, sa.ForeignKey("establishments.id"), primary_key=True
        ),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("establishment_id", sa.Integer, nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("envelope_from", sa.String(320), nullable=False),
        sa.Column("header_from", sa.String(400), nullable=False, server_default=""),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("subject", sa.Text, nullable=False, server_default=""),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("smtputf8", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("idempotency_key", sa.String(200)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_expires_at", sa.Float),
    )
    op.create_index(
        "ix_messages_due",
        "messages",
        ["priority", "next_attempt_at"],
        sqlite_where=sa.text(_DUE),
        postgresql_where=sa.text(_DUE),
    )
    op.create_index(
        "ix_messages_leases",
        "messages",
        ["lease_expires_at"],
        sqlite_where=sa.text(_SENDING),
        postgresql_where=sa.text(_SENDING),
    )
    op.create_index("ix_messages_user", "messages", ["user_id", "created_at"])
    op.create_index(
        "ix_messages_establishment", "messages", ["establishment_id", "status", "created_at"]
    )
    op.create_index(
        "ux_messages_idempotency", "messages", ["user_id", "idempotency_key"], unique=True
    )
    op.create_table(
        "message_bodies",
        sa.Column("message_id", sa.String(32), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "recipients",
        sa.Column("message_id", sa.String(32), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("code", sa.Integer),
        sa.Column("reply", sa.Text),
        sa.Column("updated_at", sa.Float),
    )
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("message_id", sa.String(32), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        sa.Column("relay", sa.String(300), nullable=False),
        sa.Column("outcome", sa.String(12), nullable=False),
        sa.Column("code", sa.Integer),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_attempts_message", "attempts", ["message_id"])
    # A single school never sees the notion of establishments: one exists from the start.
    op.bulk_insert(
        est,
        [{"slug": "default", "name": "Default", "hosted": False, "disabled": False,
          "created_at": time.time()}],
    )


def downgrade() -> None:
    for name in (
        "attempts",
        "recipients",
        "message_bodies",
        "messages",
        "settings",
        "tokens",
        "users",
        "establishments",
    ):
        op.drop_table(name)
