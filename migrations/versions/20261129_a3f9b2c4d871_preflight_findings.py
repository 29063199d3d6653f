"""preflight findings: jobs record their preflight, teachers how their scores were chosen,
datasets their inputs' stored dtype and value range

Revision ID: a3f9b2c4d871
Revises: 5e1a7c2d9b40
Create Date: 2026-11-29 11:40:00.000000

All three are nullable: rows written before keep null (no preflight ran, scores chosen as the
first output and assumed to be logits, input range unknown).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'a3f9b2c4d871'
down_revision: str | None = '5e1a7c2d9b40'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('preflight', sa.JSON(), nullable=True))
    with op.batch_alter_table('teachers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scores_choice', sa.JSON(), nullable=True))
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('input_stats', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('input_stats')
    with op.batch_alter_table('teachers', schema=None) as batch_op:
        batch_op.drop_column('scores_choice')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('preflight')
