"""Retention (issue 9): indexes for pruning finished jobs and collecting old blobs.

On SQLite the blobs table is also rebuilt with ``data`` as its last column, so
that a streamed upload writes into the row in place (issue 11) instead of
rebuilding it in memory; PostgreSQL stores the bytes out of line anyway.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_finished_at_state", "jobs", ["finished_at", "state"])
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table(
            "blobs",
            recreate="always",
            partial_reordering=[("digest", "size", "created_at", "data")],
        ):
            pass
    op.create_index("ix_blobs_created_at", "blobs", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_blobs_created_at", table_name="blobs")
    op.drop_index("ix_jobs_finished_at_state", table_name="jobs")
