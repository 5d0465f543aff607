"""Plans: revisions of multi-VM plans, their runs (leased to a controller) and each run's VMs.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# frozen copies of the types: a migration must keep meaning the same thing when tables.py changes
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TIME = sa.DateTime(timezone=True)
_NAME = sa.String(63)
_RUN_ID = sa.String(64)


def upgrade() -> None:
    """Create the four plan tables."""
    op.create_table(
        "plans",
        sa.Column("name", _NAME, nullable=False),
        sa.Column("current_revision", sa.Integer(), nullable=False),
        sa.Column("destroyed", sa.Boolean(), nullable=False),
        sa.Column("update_time", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_plans"),
    )
    op.create_table(
        "plan_revisions",
        sa.Column("plan", _NAME, nullable=False),
        sa.Column("revision", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("digest", sa.String(128), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("body", _JSON, nullable=False),
        sa.Column("create_time", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["plan"], ["plans.name"], name="fk_plan_revisions_plan_plans"),
        sa.PrimaryKeyConstraint("plan", "revision", name="pk_plan_revisions"),
    )
    op.create_table(
        "plan_runs",
        sa.Column("id", _RUN_ID, nullable=False),
        sa.Column("plan", _NAME, nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("options", _JSON, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("lease_until", _TIME, nullable=True),
        sa.Column("create_time", _TIME, nullable=False),
        sa.Column("update_time", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["plan"], ["plans.name"], name="fk_plan_runs_plan_plans"),
        sa.PrimaryKeyConstraint("id", name="pk_plan_runs"),
        # a retried request finds its run; NULL (no request id) may repeat on both backends
        sa.UniqueConstraint("plan", "request_id", name="uq_plan_runs_plan_request_id"),
    )
    op.create_index("ix_plan_runs_plan_create_time", "plan_runs", ["plan", "create_time"])
    op.create_index("ix_plan_runs_state", "plan_runs", ["state"])
    op.create_table(
        "plan_run_vms",
        sa.Column("run_id", _RUN_ID, nullable=False),
        sa.Column("service", _NAME, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("vm", _NAME, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("step", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("failed_probe", sa.Text(), nullable=False),
        sa.Column("host", _NAME, nullable=False),
        sa.Column("change", sa.String(16), nullable=False),
        sa.Column("created", sa.Boolean(), nullable=False),
        sa.Column("update_time", _TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["plan_runs.id"], name="fk_plan_run_vms_run_id_plan_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "service", name="pk_plan_run_vms"),
    )


def downgrade() -> None:
    """Drop them."""
    op.drop_table("plan_run_vms")
    op.drop_index("ix_plan_runs_state", "plan_runs")
    op.drop_index("ix_plan_runs_plan_create_time", "plan_runs")
    op.drop_table("plan_runs")
    op.drop_table("plan_revisions")
    op.drop_table("plans")
