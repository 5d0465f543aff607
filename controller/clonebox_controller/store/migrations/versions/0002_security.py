"""Security: revoked certificates and join tokens.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the deny list and the join tokens."""
    op.create_table(
        "revoked_certificates",
        sa.Column("serial", sa.String(64), nullable=False),
        sa.Column("identity", sa.String(255), nullable=False),
        sa.Column("revoked_time", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("serial"),
    )
    op.create_table(
        "join_tokens",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("host", sa.String(63), nullable=False),
        sa.Column("expire_time", _TIME, nullable=False),
        sa.Column("used_time", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    """Drop them."""
    op.drop_table("join_tokens")
    op.drop_table("revoked_certificates")
