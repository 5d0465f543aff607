"""The agent's event revision of what the store last recorded about each VM, to order its events.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``vms.agent_epoch`` and ``vms.agent_sequence`` (NULL: nothing recorded with a revision yet)."""
    op.add_column("vms", sa.Column("agent_epoch", sa.BigInteger(), nullable=True))
    op.add_column("vms", sa.Column("agent_sequence", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Drop the two columns."""
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("agent_sequence")
        batch.drop_column("agent_epoch")
