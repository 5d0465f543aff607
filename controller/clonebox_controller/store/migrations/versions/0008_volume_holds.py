"""Volume reservations a plan run holds: the disk of each volume an apply will make, reserved at apply.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``volume_reservations.held_by`` (the holding run's id; NULL: the volume's own reservation)."""
    op.add_column("volume_reservations", sa.Column("held_by", sa.String(63), nullable=True))


def downgrade() -> None:
    """Drop the column; held reservations go with it (their runs cannot be resumed across a downgrade)."""
    op.execute("DELETE FROM volume_reservations WHERE held_by IS NOT NULL")
    with op.batch_alter_table("volume_reservations") as batch:
        batch.drop_column("held_by")
