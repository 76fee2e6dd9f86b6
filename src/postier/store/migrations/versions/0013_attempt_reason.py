"""Each delivery attempt keeps why it failed as a code and its parameters (``reason``, a
JSON document as :meth:`postier.errors.PostierError.dump` writes it), so that pages and the
API say it in the reader's language and to the reader's rank. Attempts recorded before
have none and are shown as their stored ``detail``.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("attempts", sa.Column("reason", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("reason")
