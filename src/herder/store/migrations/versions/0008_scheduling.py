"""Scheduler (issue 13): GPUs, agent limits, fair share between owners.

Tasks get ``gpus`` and a ``share_key`` (their place in the owner's weighted
queue), and the claim index orders by it after the priority; agents get
``gpus`` and their own limits; ``owner_shares`` holds weights and clocks.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

QUEUED_REMOTE = "state = 'queued' AND placement = 'remote'"


def _claim_index(columns: list[object]) -> None:
    op.drop_index("ix_tasks_claim", table_name="tasks")
    op.create_index(
        "ix_tasks_claim",
        "tasks",
        columns,  # type: ignore[arg-type]
        unique=False,
        sqlite_where=sa.text(QUEUED_REMOTE),
        postgresql_where=sa.text(QUEUED_REMOTE),
    )


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("gpus", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("share_key", sa.Float(), server_default="0", nullable=False))
    # Queued tasks from before keep their order: their ids are their ages.
    op.execute("UPDATE tasks SET share_key = id")
    _claim_index([sa.text("priority DESC"), "share_key", "id"])
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("gpus", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("max_ram_mb", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_load", sa.Float(), nullable=True))
    op.create_table(
        "owner_shares",
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("weight", sa.Float(), server_default="1", nullable=False),
        sa.Column("clock", sa.Float(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("owner", name=op.f("pk_owner_shares")),
    )
    op.execute(
        "INSERT INTO owner_shares (owner, weight, clock) "
        "SELECT coalesce(owner, ''), 1, 0 FROM jobs GROUP BY coalesce(owner, '')"
    )
    op.execute("UPDATE owner_shares SET clock = (SELECT coalesce(max(id), 0) FROM tasks)")
    op.create_index("ix_attempts_finished_at", "attempts", ["finished_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_attempts_finished_at", table_name="attempts")
    op.drop_table("owner_shares")
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("max_load")
        batch.drop_column("max_ram_mb")
        batch.drop_column("gpus")
    _claim_index([sa.text("priority DESC"), "id"])
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("share_key")
        batch.drop_column("gpus")
