"""Health: current health per VM, transitions (resumable by seq), per-minute aggregates, actions.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# frozen copies of the types: a migration must keep meaning the same thing when tables.py changes
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TIME = sa.DateTime(timezone=True)
_NAME = sa.String(63)
#: SQLite auto-numbers only an INTEGER PRIMARY KEY (its rowid)
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the four health tables."""
    op.create_table(
        "health_current",
        sa.Column("vm", _NAME, nullable=False),
        sa.Column("host", _NAME, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("document", _JSON, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("vm", name="pk_health_current"),
    )
    op.create_index("ix_health_current_host", "health_current", ["host"])
    op.create_table(
        "health_transitions",
        sa.Column("seq", _SEQ, autoincrement=True, nullable=False),
        sa.Column("vm", _NAME, nullable=False),
        sa.Column("host", _NAME, nullable=False),
        sa.Column("check", _NAME, nullable=False),
        sa.Column("from_state", sa.String(16), nullable=False),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("time", _TIME, nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_health_transitions"),
        # AUTOINCREMENT: SQLite never hands out a seq twice, even after the newest rows are deleted
        sqlite_autoincrement=True,
    )
    op.create_index("ix_health_transitions_vm_time", "health_transitions", ["vm", "time"])
    op.create_index("ix_health_transitions_time", "health_transitions", ["time"])
    op.create_table(
        "health_minutes",
        sa.Column("vm", _NAME, nullable=False),
        sa.Column("check", _NAME, nullable=False),
        sa.Column("minute", _TIME, nullable=False),
        sa.Column("passes", sa.Integer(), nullable=False),
        sa.Column("warnings", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("no_data", sa.Integer(), nullable=False),
        sa.Column("duration_us_sum", sa.BigInteger(), nullable=False),
        sa.Column("duration_us_max", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("vm", "check", "minute", name="pk_health_minutes"),
    )
    op.create_index("ix_health_minutes_minute", "health_minutes", ["minute"])
    op.create_table(
        "health_actions",
        sa.Column("id", _SEQ, autoincrement=True, nullable=False),
        sa.Column("vm", _NAME, nullable=False),
        sa.Column("check", _NAME, nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("time", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_health_actions"),
        sa.UniqueConstraint("vm", "check", "trigger", "time", name="uq_health_actions_vm_check_trigger_time"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_health_actions_vm_time", "health_actions", ["vm", "time"])
    op.create_index("ix_health_actions_time", "health_actions", ["time"])


def downgrade() -> None:
    """Drop them."""
    op.drop_index("ix_health_actions_time", "health_actions")
    op.drop_index("ix_health_actions_vm_time", "health_actions")
    op.drop_table("health_actions")
    op.drop_index("ix_health_minutes_minute", "health_minutes")
    op.drop_table("health_minutes")
    op.drop_index("ix_health_transitions_time", "health_transitions")
    op.drop_index("ix_health_transitions_vm_time", "health_transitions")
    op.drop_table("health_transitions")
    op.drop_index("ix_health_current_host", "health_current")
    op.drop_table("health_current")
