"""tenants and API keys: teachers, datasets and jobs belong to a tenant; aliases are unique per
tenant. Rows from before belong to the `default` tenant (the one used with authentication off).

Revision ID: d9a4f0c3e7b1
Revises: c4e8a1b2d6f5
Create Date: 2026-11-29 21:50:00.000000
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = 'd9a4f0c3e7b1'
down_revision: str | None = 'c4e8a1b2d6f5'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWNED = ('teachers', 'datasets', 'jobs')


def upgrade() -> None:
    tenants = op.create_table(
        'tenants',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('created_at', app.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name'),
    )
    op.bulk_insert(
        tenants, [{'id': 'default', 'name': 'default', 'created_at': datetime.now(UTC)}]
    )
    op.create_table(
        'api_keys',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('tenant_id', sa.String(length=36), nullable=False),
        sa.Column('prefix', sa.String(length=16), nullable=False),
        sa.Column('hash', sa.String(length=255), nullable=False),
        sa.Column('role', sa.String(length=16), nullable=False),
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('created_at', app.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column('expires_at', app.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column('revoked_at', app.models.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('prefix'),
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_tenant_id'), ['tenant_id'], unique=False)
    for table in OWNED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('tenant_id', sa.String(length=36), nullable=True))
        op.execute(f"UPDATE {table} SET tenant_id = 'default'")
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column('tenant_id', existing_type=sa.String(length=36), nullable=False)
            batch_op.create_index(batch_op.f(f'ix_{table}_tenant_id'), ['tenant_id'], unique=False)
            batch_op.create_foreign_key(f'fk_{table}_tenant_id', 'tenants', ['tenant_id'], ['id'])
            if table == 'jobs':
                batch_op.drop_constraint('uq_jobs_alias', type_='unique')
                batch_op.create_unique_constraint('uq_jobs_tenant_alias', ['tenant_id', 'alias'])


def downgrade() -> None:
    # Aliases were unique across tenants: of jobs sharing one, the oldest keeps it.
    op.execute(
        "UPDATE jobs SET alias = NULL WHERE alias IS NOT NULL AND EXISTS (SELECT 1 FROM jobs AS other "
        "WHERE other.alias = jobs.alias AND (other.created_at < jobs.created_at "
        "OR (other.created_at = jobs.created_at AND other.id < jobs.id)))"
    )
    for table in reversed(OWNED):
        with op.batch_alter_table(table, schema=None) as batch_op:
            if table == 'jobs':
                batch_op.drop_constraint('uq_jobs_tenant_alias', type_='unique')
                batch_op.create_unique_constraint('uq_jobs_alias', ['alias'])
            batch_op.drop_constraint(f'fk_{table}_tenant_id', type_='foreignkey')
            batch_op.drop_index(batch_op.f(f'ix_{table}_tenant_id'))
            batch_op.drop_column('tenant_id')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_tenant_id'))
    op.drop_table('api_keys')
    op.drop_table('tenants')
