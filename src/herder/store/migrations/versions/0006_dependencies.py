"""Job dependencies and frame order (issue 13).

``job_deps`` (a job waits for its parents), ``jobs.on_parent_failure`` and
``jobs.frame_order`` (herder.store.deps).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "jobs",
        sa.Column("on_parent_failure", sa.String(8), nullable=False, server_default="fail"),
    )
    op.add_column(
        "jobs",
        sa.Column("frame_order", sa.String(32), nullable=False, server_default="sequential"),
    )
    op.create_table(
        "job_deps",
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("parent_id", sa.Integer, nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_deps_job_id_jobs", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["jobs.id"], name="fk_job_deps_parent_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "parent_id", name="pk_job_deps"),
    )
    op.create_index("ix_job_deps_parent_id", "job_deps", ["parent_id"])


def downgrade() -> None:
    op.drop_index("ix_job_deps_parent_id", table_name="job_deps")
    op.drop_table("job_deps")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("frame_order")
        batch.drop_column("on_parent_failure")
