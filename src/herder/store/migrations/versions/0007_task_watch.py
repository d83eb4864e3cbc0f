"""Memory-aware retry, progress and stuck tasks (issue 13).

Tasks get ``progress_pattern``, ``stuck_timeout_s`` and ``memory_failures``;
attempts get ``progress`` and ``peak_rss_mb``. Plain column additions: no
table is rebuilt on SQLite.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("progress_pattern", sa.Text, nullable=True))
    op.add_column("tasks", sa.Column("stuck_timeout_s", sa.Float, nullable=True))
    op.add_column(
        "tasks",
        sa.Column("memory_failures", sa.Integer, nullable=False, server_default="0"),
    )
    op.add_column("attempts", sa.Column("progress", sa.Float, nullable=True))
    op.add_column("attempts", sa.Column("peak_rss_mb", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("peak_rss_mb")
        batch.drop_column("progress")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("memory_failures")
        batch.drop_column("stuck_timeout_s")
        batch.drop_column("progress_pattern")
