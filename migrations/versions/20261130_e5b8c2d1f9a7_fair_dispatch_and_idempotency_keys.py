"""fair dispatch, idempotency keys, retention, phase times: tenants record when a worker last took
one of their jobs (round-robin among tenants); requests made with an Idempotency-Key are kept with
their response; jobs record when their artifacts were removed by the retention setting, and how
long each phase took.

Revision ID: e5b8c2d1f9a7
Revises: d9a4f0c3e7b1
Create Date: 2026-11-30 00:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = 'e5b8c2d1f9a7'
down_revision: str | None = 'd9a4f0c3e7b1'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('dispatched_at', app.models.UTCDateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('artifacts_removed_at', app.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column('phase_seconds', sa.JSON(), nullable=True))
    op.create_table(
        'idempotency_keys',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('tenant_id', sa.String(length=36), nullable=False),
        sa.Column('key', sa.String(length=255), nullable=False),
        sa.Column('target', sa.String(length=255), nullable=False),
        sa.Column('fingerprint', sa.String(length=64), nullable=False),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('response', sa.JSON(), nullable=True),
        sa.Column('headers', sa.JSON(), nullable=True),
        sa.Column('created_at', app.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column('expires_at', app.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('tenant_id', 'key', name='uq_idempotency_tenant_key'),
    )
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f('ix_idempotency_keys_expires_at'), ['expires_at'], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_idempotency_keys_expires_at'))
    op.drop_table('idempotency_keys')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('phase_seconds')
        batch_op.drop_column('artifacts_removed_at')
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.drop_column('dispatched_at')
