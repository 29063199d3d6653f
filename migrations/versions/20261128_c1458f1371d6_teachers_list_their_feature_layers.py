"""teachers list their feature layers

Revision ID: c1458f1371d6
Revises: 89367ce66269
Create Date: 2026-11-28 08:42:06.031992
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = 'c1458f1371d6'
down_revision: str | None = '89367ce66269'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('teachers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('feature_layers', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('teachers', schema=None) as batch_op:
        batch_op.drop_column('feature_layers')
