"""Delivery guarantees (issue 4): retry-elsewhere, blocklist, drain, maintenance lock.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("last_failed_agent_id", sa.String(length=100), nullable=True))
    op.add_column(
        "agents",
        sa.Column("drain_requested", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.create_table(
        "agent_job_failures",
        sa.Column("agent_id", sa.String(length=100), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_failure_at", sa.DateTime(), nullable=True),
        sa.Column("blocked_until", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_agent_job_failures_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("agent_id", "job_id", name=op.f("pk_agent_job_failures")),
    )
    op.create_table(
        "maintenance_lock",
        sa.Column("name", sa.String(length=50), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_maintenance_lock")),
    )


def downgrade() -> None:
    op.drop_table("maintenance_lock")
    op.drop_table("agent_job_failures")
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("drain_requested")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("last_failed_agent_id")
