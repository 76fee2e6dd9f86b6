"""The queue's due index led by the establishment: claims take each establishment's due
e-mails in turn (round-robin), so one establishment's flood holds back no other's. It
replaces ``ix_messages_due`` (priority, next_attempt_at), which only served a claim in one
queue-wide order.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_DUE = sa.text("status IN ('queued', 'deferred')")


def upgrade() -> None:
    op.create_index(
        "ix_messages_due_establishment", "messages",
        ["establishment_id", "priority", "next_attempt_at"],
        sqlite_where=_DUE, postgresql_where=_DUE,
    )
    op.drop_index("ix_messages_due", table_name="messages")


def downgrade() -> None:
    op.create_index(
        "ix_messages_due", "messages", ["priority", "next_attempt_at"],
        sqlite_where=_DUE, postgresql_where=_DUE,
    )
    op.drop_index("ix_messages_due_establishment", table_name="messages")
