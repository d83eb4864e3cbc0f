"""Pool ACLs and what agents accept (issue 11).

``pool_acls``: per pool, the owners allowed to submit; ``acl_version``: one
row bumped by every ACL write (the claim re-checks the queue when it moved);
``agents.accept_owners``/``accept_pools``: whose work an agent takes.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pool_acls",
        sa.Column("pool", sa.String(length=200), nullable=False),
        sa.Column("allow", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("pool", name=op.f("pk_pool_acls")),
    )
    op.create_table(
        "acl_version",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_acl_version")),
    )
    op.add_column("agents", sa.Column("accept_owners", sa.JSON(), nullable=True))
    op.add_column("agents", sa.Column("accept_pools", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("accept_pools")
        batch.drop_column("accept_owners")
    op.drop_table("acl_version")
    op.drop_table("pool_acls")
