"""Recipients queued through the HTTP API (and SMTP submission) per account and per
establishment, per clock minute and per UTC day: the submission pace, shared by every
process of an installation. One row per scope (``a:<user id>``, ``e:<establishment id>``),
span (``m`` minute, ``d`` day) and bucket (the minute's or day's number since the epoch);
a scope's older buckets are deleted as new ones begin.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_usage",
        sa.Column("scope", sa.String(40), primary_key=True),
        sa.Column("span", sa.String(1), primary_key=True),
        sa.Column("bucket", sa.Integer, primary_key=True),
        sa.Column("amount", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("api_usage")
