"""Audit log: the keyed hash chain, its head, its archive anchor and agents' head witnesses.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TIME = sa.DateTime(timezone=True)
_GENESIS = "00" * 32


def upgrade() -> None:
    """Create the chain tables and seed the empty head and the genesis anchor."""
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("time", _TIME, nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("resource", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("origin", sa.String(80), nullable=False),
        sa.Column("details", _JSON, nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("prev_mac", sa.String(64), nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_events"),
        sa.UniqueConstraint("event_id", name="uq_audit_events_event_id"),
    )
    for column in ("time", "actor", "action", "resource"):
        op.create_index(f"ix_audit_events_{column}", "audit_events", [column])
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_head"),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "mac": _GENESIS}])
    anchor = op.create_table(
        "audit_anchor",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("seal", sa.String(64), nullable=False),
        sa.Column("archived_time", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_anchor"),
    )
    op.bulk_insert(anchor, [{"id": 1, "seq": 0, "mac": _GENESIS, "key_id": "", "seal": "", "archived_time": None}])
    op.create_table(
        "audit_witnesses",
        sa.Column("source", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
        sa.Column("report_time", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("source", name="pk_audit_witnesses"),
    )


def downgrade() -> None:
    """Drop them."""
    op.drop_table("audit_witnesses")
    op.drop_table("audit_anchor")
    op.drop_table("audit_head")
    for column in ("time", "actor", "action", "resource"):
        op.drop_index(f"ix_audit_events_{column}", "audit_events")
    op.drop_table("audit_events")
