"""Master directory (issue 5): masters, master_failures; agents.mode.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "agents",
        sa.Column("mode", sa.String(length=16), server_default="master", nullable=False),
    )
    op.create_table(
        "masters",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("role", sa.String(length=16), server_default="read-write", nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_timeout_s", sa.Float(), nullable=False),
        sa.Column("requests", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("unhandled_exceptions", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("avg_request_ms", sa.Float(), server_default="0", nullable=False),
        sa.Column("in_flight", sa.Integer(), server_default="0", nullable=False),
        sa.Column("version", sa.String(length=100), nullable=True),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_failure_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_masters")),
    )
    op.create_table(
        "master_failures",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("master_id", sa.String(length=200), nullable=False),
        sa.Column("reported_at", sa.DateTime(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("reporter", sa.String(length=200), nullable=False),
        sa.Column("request", sa.String(length=500), nullable=False),
        sa.Column("kind", sa.String(length=50), nullable=False),
        sa.Column("url", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["master_id"],
            ["masters.id"],
            name=op.f("fk_master_failures_master_id_masters"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_master_failures")),
    )
    op.create_index(
        "ix_master_failures_master_id_id", "master_failures", ["master_id", "id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_master_failures_master_id_id", table_name="master_failures")
    op.drop_table("master_failures")
    op.drop_table("masters")
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("mode")
