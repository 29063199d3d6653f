"""datasets can be unlabelled transfer sets

Revision ID: 89367ce66269
Revises: cd55787ed229
Create Date: 2026-11-28 07:06:17.434731
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = '89367ce66269'
down_revision: str | None = 'cd55787ed229'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('labelled', sa.Boolean(), server_default=sa.true(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('labelled')
