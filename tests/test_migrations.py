"""The Alembic history builds exactly the tables the models describe, and can be walked back."""

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from alembic import command
from sqlalchemy import delete, select, text

from app.cli import alembic_config
from app.db import get_engine, session_scope
from app.ml.signature import ModelSignature
from app.models import ApiKey, Dataset, Job, JobTeacher, Teacher, Tenant
from tests.helpers.stacks import Stack

BEFORE_SIGNATURES = "c1458f1371d6"


@pytest.fixture(autouse=True)
def _keep_the_stack_key(stack: Stack) -> Iterator[None]:
    """Walking the history down drops the tenants and keys: the stack's are put back after."""
    with session_scope() as session:
        kept = [
            {c.key: getattr(row, c.key) for c in model.__table__.columns}
            for model in (Tenant, ApiKey)
            for row in session.scalars(select(model))
        ]
    yield
    with session_scope() as session:
        for model in (Tenant, ApiKey):
            for row in kept:
                if row.keys() == set(model.__table__.columns.keys()):
                    session.merge(model(**row))
            session.flush()


def test_migrations_match_models(stack: Stack) -> None:
    command.check(alembic_config())  # raises if autogenerate would find any difference


def test_downgrade_and_upgrade_again(stack: Stack) -> None:
    config = alembic_config()
    command.downgrade(config, "base")
    get_engine().dispose()
    command.upgrade(config, "head")
    command.check(config)


def test_stored_rows_get_signatures_and_ensemble_memberships_and_back(stack: Stack) -> None:
    """Rows written before signatures (input_shape/num_classes columns, ensembles only in the
    spec JSON) are converted on upgrade and restored on downgrade."""
    config = alembic_config()
    command.downgrade(config, BEFORE_SIGNATURES)
    get_engine().dispose()
    old_teacher = {
        "id": "t1",
        "name": "t",
        "format": "onnx",
        "sha256": "0" * 64,
        "size_bytes": 1,
        "parameter_count": 1,
        "input_shape": json.dumps([1, 8, 8]),
        "num_classes": 10,
        "input_name": "pixels",
        "output_name": "scores",
        "storage_key": "k",
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    with get_engine().begin() as connection:
        connection.execute(
            text(
                "INSERT INTO teachers (id, name, format, sha256, size_bytes, parameter_count, "
                "input_shape, num_classes, input_name, output_name, storage_key, created_at) "
                "VALUES (:id, :name, :format, :sha256, :size_bytes, :parameter_count, "
                ":input_shape, :num_classes, :input_name, :output_name, :storage_key, :created_at)"
            ),
            [old_teacher, old_teacher | {"id": "t2", "input_name": None, "output_name": None}],
        )
        connection.execute(
            text(
                "INSERT INTO datasets (id, name, sha256, size_bytes, input_shape, num_classes, "
                "train_size, test_size, has_test_split, labelled, storage_key, created_at) VALUES "
                "('d1', 'd', :sha, 1, :shape, 3, 8, 2, true, true, 'k', :at)"
            ),
            {"sha": "0" * 64, "shape": json.dumps([4]), "at": old_teacher["created_at"]},
        )
        ensemble = {"teachers": [{"id": "t1", "weight": 3.0}, {"id": "t2"}], "dataset": "d1"}
        connection.execute(
            text(
                "INSERT INTO jobs (id, status, phase, progress, spec, teacher_id, dataset_ref, "
                "attempt, cancel_requested, created_at) VALUES "
                "('j1', 'queued', 'queued', 0, :spec, 't1', 'd1', 0, false, :at)"
            ),
            {"spec": json.dumps(ensemble), "at": old_teacher["created_at"]},
        )
    try:
        command.upgrade(config, "head")
        get_engine().dispose()
        with session_scope() as session:
            teachers = {t.id: t for t in session.scalars(select(Teacher))}
            assert ModelSignature.model_validate(teachers["t1"].signature) == (
                ModelSignature.for_tensor((1, 8, 8), 10, input_name="pixels", output_name="scores")
            )
            assert ModelSignature.model_validate(teachers["t2"].signature) == (
                ModelSignature.for_tensor((1, 8, 8), 10)
            )
            dataset = session.get(Dataset, "d1")
            assert dataset is not None
            assert ModelSignature.model_validate(dataset.signature) == (
                ModelSignature.for_tensor((4,), 3)
            )
            job = session.get(Job, "j1")
            assert job is not None and job.teacher_id == "t1"  # no cascade from rebuilt tables
            members = session.scalars(select(JobTeacher).order_by(JobTeacher.position))
            assert [(m.teacher_id, m.position) for m in members] == [("t1", 0), ("t2", 1)]

        command.downgrade(config, BEFORE_SIGNATURES)
        get_engine().dispose()
        with get_engine().connect() as connection:
            rows = connection.execute(
                text("SELECT id, input_shape, num_classes, input_name FROM teachers ORDER BY id")
            ).all()
            restored = [
                (r[0], json.loads(r[1]) if isinstance(r[1], str) else r[1], r[2], r[3])
                for r in rows
            ]
            assert restored == [("t1", [1, 8, 8], 10, "pixels"), ("t2", [1, 8, 8], 10, "input")]
            job_teacher = connection.execute(text("SELECT teacher_id FROM jobs")).scalar_one()
            assert job_teacher == "t1"
    finally:
        command.upgrade(config, "head")
        get_engine().dispose()
        with session_scope() as session:
            for table in (Job, Dataset, Teacher):
                session.execute(delete(table))
