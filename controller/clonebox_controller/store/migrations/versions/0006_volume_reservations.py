"""Volume reservations: the disk each agent volume takes on its host, counted by placement.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# frozen copies of the types: a migration must keep meaning the same thing when tables.py changes
_TIME = sa.DateTime(timezone=True)
_NAME = sa.String(63)


def upgrade() -> None:
    """Create ``volume_reservations`` (a host's rows go with the host)."""
    op.create_table(
        "volume_reservations",
        sa.Column("host", _NAME, nullable=False),
        sa.Column("name", _NAME, nullable=False),
        sa.Column("size_mib", sa.BigInteger(), nullable=False),
        sa.Column("create_time", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["host"], ["hosts.name"], name="fk_volume_reservations_host_hosts", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("host", "name", name="pk_volume_reservations"),
    )


def downgrade() -> None:
    """Drop ``volume_reservations``."""
    op.drop_table("volume_reservations")
