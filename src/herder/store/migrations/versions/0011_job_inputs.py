"""Jobs held until their inputs are uploaded (issue 10, two-transaction submission).

``job_inputs``: the digests a job submitted with ``inputs=later`` still waits
for (herder.store.inputs).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_inputs",
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_inputs_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "digest", name="pk_job_inputs"),
    )
    op.create_index("ix_job_inputs_digest", "job_inputs", ["digest"])


def downgrade() -> None:
    op.drop_index("ix_job_inputs_digest", table_name="job_inputs")
    op.drop_table("job_inputs")
