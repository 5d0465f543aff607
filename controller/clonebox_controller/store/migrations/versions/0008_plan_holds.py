"""Room a plan run holds at apply beyond its new VMs: the disk of the volumes it will make, and a replace's successor.

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
    """Add ``volume_reservations.held_by`` and ``vms.held_for`` (a run's id; NULL: no run holds the room)."""
    op.add_column("volume_reservations", sa.Column("held_by", sa.String(64), nullable=True))
    op.add_column("vms", sa.Column("held_for", sa.String(64), nullable=True))


def downgrade() -> None:
    """Drop both; held volume reservations go (their runs cannot be resumed across a downgrade)."""
    op.execute("DELETE FROM volume_reservations WHERE held_by IS NOT NULL")
    with op.batch_alter_table("volume_reservations") as batch:
        batch.drop_column("held_by")
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("held_for")
