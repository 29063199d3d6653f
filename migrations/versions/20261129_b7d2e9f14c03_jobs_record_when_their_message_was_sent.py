"""jobs record when their message was sent (recovery resends a queued job's lost message)

Revision ID: b7d2e9f14c03
Revises: a3f9b2c4d871
Create Date: 2026-11-29 12:05:00.000000

Existing jobs take their creation time.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'b7d2e9f14c03'
down_revision: str | None = 'a3f9b2c4d871'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET enqueued_at = created_at")


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('enqueued_at')
