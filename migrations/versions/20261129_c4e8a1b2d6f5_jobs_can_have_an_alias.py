"""jobs can have an alias: the name their student is served by

Revision ID: c4e8a1b2d6f5
Revises: b7d2e9f14c03
Create Date: 2026-11-29 12:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'c4e8a1b2d6f5'
down_revision: str | None = 'b7d2e9f14c03'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('alias', sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint('uq_jobs_alias', ['alias'])


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('uq_jobs_alias', type_='unique')
        batch_op.drop_column('alias')
