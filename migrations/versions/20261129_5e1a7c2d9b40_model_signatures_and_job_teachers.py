"""model signatures replace input_shape/num_classes; job_teachers holds ensemble membership

Revision ID: 5e1a7c2d9b40
Revises: c1458f1371d6
Create Date: 2026-11-29 09:50:00.000000

Stored rows are converted both ways: a signature is built from the old columns (one FP32 input
named as before, `logits` out), and the old columns are read back from a signature on downgrade.
Ensemble membership is filled from each job's stored spec.
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = '5e1a7c2d9b40'
down_revision: str | None = 'c1458f1371d6'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _signature(
    input_shape: list[int], num_classes: int, input_name: str | None, output_name: str | None
) -> dict[str, Any]:
    # The JSON form of app.ml.signature.ModelSignature.for_tensor at the time of this migration.
    return {
        "task": "classification",
        "inputs": [{"name": input_name or "input", "datatype": "FP32", "shape": list(input_shape)}],
        "outputs": [
            {
                "name": output_name or "logits",
                "datatype": "FP32",
                "shape": [num_classes],
                "kind": "logits",
                "classes": None,
            }
        ],
        "preprocessing": {"kind": "tensor"},
    }


def upgrade() -> None:
    bind = op.get_bind()
    for table in ("teachers", "datasets"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column('signature', sa.JSON(), nullable=True))
    teachers = sa.table(
        'teachers',
        sa.column('id', sa.String),
        sa.column('input_shape', sa.JSON),
        sa.column('num_classes', sa.Integer),
        sa.column('input_name', sa.String),
        sa.column('output_name', sa.String),
        sa.column('signature', sa.JSON),
    )
    for row in bind.execute(sa.select(teachers)).all():
        bind.execute(
            teachers.update()
            .where(teachers.c.id == row.id)
            .values(
                signature=_signature(
                    row.input_shape, row.num_classes, row.input_name, row.output_name
                )
            )
        )
    datasets = sa.table(
        'datasets',
        sa.column('id', sa.String),
        sa.column('input_shape', sa.JSON),
        sa.column('num_classes', sa.Integer),
        sa.column('signature', sa.JSON),
    )
    for row in bind.execute(sa.select(datasets)).all():
        bind.execute(
            datasets.update()
            .where(datasets.c.id == row.id)
            .values(signature=_signature(row.input_shape, row.num_classes, None, None))
        )
    with op.batch_alter_table('teachers') as batch_op:
        batch_op.alter_column('signature', existing_type=sa.JSON(), nullable=False)
        for column in ('input_shape', 'num_classes', 'input_name', 'output_name'):
            batch_op.drop_column(column)
    with op.batch_alter_table('datasets') as batch_op:
        batch_op.alter_column('signature', existing_type=sa.JSON(), nullable=False)
        batch_op.drop_column('input_shape')
        batch_op.drop_column('num_classes')

    job_teachers = op.create_table(
        'job_teachers',
        sa.Column('job_id', sa.String(length=36), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('teacher_id', sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['teacher_id'], ['teachers.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('job_id', 'position'),
    )
    with op.batch_alter_table('job_teachers') as batch_op:
        batch_op.create_index(
            batch_op.f('ix_job_teachers_teacher_id'), ['teacher_id'], unique=False
        )
    jobs = sa.table('jobs', sa.column('id', sa.String), sa.column('spec', sa.JSON))
    existing = {row.id for row in bind.execute(sa.select(teachers.c.id)).all()}
    members = []
    for job in bind.execute(sa.select(jobs)).all():
        spec = job.spec or {}
        ids = [t['id'] for t in spec.get('teachers') or []] or [spec.get('teacher')]
        members += [
            {'job_id': job.id, 'position': i, 'teacher_id': tid}
            for i, tid in enumerate(ids)
            if tid in existing
        ]
    if members:
        op.bulk_insert(job_teachers, members)


def downgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table('job_teachers') as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_teachers_teacher_id'))
    op.drop_table('job_teachers')
    with op.batch_alter_table('teachers') as batch_op:
        batch_op.add_column(sa.Column('input_shape', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('num_classes', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('input_name', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('output_name', sa.String(length=255), nullable=True))
    with op.batch_alter_table('datasets') as batch_op:
        batch_op.add_column(sa.Column('input_shape', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('num_classes', sa.Integer(), nullable=True))
    for table, names in (('teachers', True), ('datasets', False)):
        rows = sa.table(
            table,
            sa.column('id', sa.String),
            sa.column('signature', sa.JSON),
            sa.column('input_shape', sa.JSON),
            sa.column('num_classes', sa.Integer),
            *([sa.column('input_name', sa.String), sa.column('output_name', sa.String)]
              if names else []),
        )
        for row in bind.execute(sa.select(rows.c.id, rows.c.signature)).all():
            first_input, scores = row.signature['inputs'][0], row.signature['outputs'][0]
            values: dict[str, Any] = {
                'input_shape': first_input['shape'],
                'num_classes': scores['shape'][0],
            }
            if names:
                values |= {'input_name': first_input['name'], 'output_name': scores['name']}
            bind.execute(rows.update().where(rows.c.id == row.id).values(**values))
    for table in ('teachers', 'datasets'):
        with op.batch_alter_table(table) as batch_op:
            batch_op.alter_column('input_shape', existing_type=sa.JSON(), nullable=False)
            batch_op.alter_column('num_classes', existing_type=sa.Integer(), nullable=False)
            batch_op.drop_column('signature')
