"""Initial fleet store schema: hosts, vms, vm_labels, vm_changes, operations, fleet_revision.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# frozen copies of the types: a migration must keep meaning the same thing when tables.py changes
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TIME = sa.DateTime(timezone=True)
_NAME = sa.String(63)


def upgrade() -> None:
    """Create the tables and seed the revision counter."""
    op.create_table(
        "hosts",
        sa.Column("name", _NAME, nullable=False),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("capacity_vcpus", sa.Integer(), nullable=False),
        sa.Column("capacity_memory_mib", sa.BigInteger(), nullable=False),
        sa.Column("capacity_disk_mib", sa.BigInteger(), nullable=False),
        sa.Column("allocatable_vcpus", sa.Integer(), nullable=False),
        sa.Column("allocatable_memory_mib", sa.BigInteger(), nullable=False),
        sa.Column("allocatable_disk_mib", sa.BigInteger(), nullable=False),
        sa.Column("hypervisor", _JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=False),
        sa.Column("cordoned", sa.Boolean(), nullable=False),
        sa.Column("registered_time", _TIME, nullable=False),
        sa.Column("last_heartbeat", _TIME, nullable=True),
        sa.Column("agent_epoch", sa.BigInteger(), nullable=False),
        sa.Column("agent_sequence", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_hosts"),
    )
    op.create_table(
        "vms",
        sa.Column("name", _NAME, nullable=False),
        sa.Column("host", _NAME, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("spec", _JSON, nullable=False),
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("addresses", _JSON, nullable=False),
        sa.Column("reserved_vcpus", sa.Integer(), nullable=False),
        sa.Column("reserved_memory_mib", sa.BigInteger(), nullable=False),
        sa.Column("reserved_disk_mib", sa.BigInteger(), nullable=False),
        sa.Column("create_time", _TIME, nullable=False),
        sa.Column("update_time", _TIME, nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["host"], ["hosts.name"], name="fk_vms_host_hosts", ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("name", name="pk_vms"),
    )
    op.create_index("ix_vms_host_name", "vms", ["host", "name"])
    op.create_index("ix_vms_state", "vms", ["state"])
    op.create_index("ix_vms_revision", "vms", ["revision"])
    op.create_table(
        "vm_labels",
        sa.Column("vm_name", _NAME, nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("value", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(["vm_name"], ["vms.name"], name="fk_vm_labels_vm_name_vms", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("vm_name", "key", name="pk_vm_labels"),
    )
    op.create_index("ix_vm_labels_key_value", "vm_labels", ["key", "value"])
    op.create_table(
        "vm_changes",
        sa.Column("revision", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("vm_name", _NAME, nullable=False),
        sa.Column("vm", _JSON, nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("change_time", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("revision", name="pk_vm_changes"),
    )
    op.create_table(
        "operations",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("vm_name", _NAME, nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("step", sa.String(255), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("done", sa.Boolean(), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=False),
        sa.Column("error_reason", sa.String(128), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.Column("error_metadata", _JSON, nullable=False),
        sa.Column("result_vm", _JSON, nullable=True),
        sa.Column("params", _JSON, nullable=False),
        sa.Column("create_time", _TIME, nullable=False),
        sa.Column("update_time", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_operations"),
        sa.UniqueConstraint("request_id", name="uq_operations_request_id"),
    )
    op.create_index("ix_operations_vm_name", "operations", ["vm_name"])
    op.create_index("ix_operations_done", "operations", ["done"])
    op.create_index("ix_operations_create_time", "operations", ["create_time"])
    fleet_revision = op.create_table(
        "fleet_revision",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("compacted", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_fleet_revision"),
    )
    op.bulk_insert(fleet_revision, [{"id": 1, "value": 0, "compacted": 0}])


def downgrade() -> None:
    """Drop everything (only for development databases)."""
    op.drop_table("fleet_revision")
    op.drop_index("ix_operations_create_time", table_name="operations")
    op.drop_index("ix_operations_done", table_name="operations")
    op.drop_index("ix_operations_vm_name", table_name="operations")
    op.drop_table("operations")
    op.drop_table("vm_changes")
    op.drop_index("ix_vm_labels_key_value", table_name="vm_labels")
    op.drop_table("vm_labels")
    op.drop_index("ix_vms_revision", table_name="vms")
    op.drop_index("ix_vms_state", table_name="vms")
    op.drop_index("ix_vms_host_name", table_name="vms")
    op.drop_table("vms")
    op.drop_table("hosts")
