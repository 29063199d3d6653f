"""Fixtures on real parts: a migrated database per stack, an API client, tiny trained teachers.

Two stacks run the same tests: ``embedded`` (SQLite file + filesystem Celery broker, no API keys)
and ``server`` (PostgreSQL + Redis, API keys required: the stack's admin key is in
``DISTILL_API_KEY`` and ``Stack.headers``). Each stack gets its own fresh database, built by
Alembic.
"""

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import delete

from app import db
from app.auth import create_key
from app.config import get_settings
from app.ml.students import CnnSpec, MlpSpec
from app.models import DEFAULT_TENANT_ID, ApiKey, Base, KeyRole, Tenant
from tests.helpers.stacks import POSTGRES_URL, REDIS_URL, Stack, admin_dsn, clear_caches
from tests.helpers.teachers import TeacherFiles, train_digits_teacher
from tests.helpers.text_teachers import synthetic_sentiment, tiny_bert_dir, zip_dir

KEPT_TABLES = {Tenant.__tablename__, ApiKey.__tablename__}

# Fixtures defined with their helpers: `start_worker` (real Celery worker processes), `url` and
# `keyed_url` (the API over HTTP).
pytest_plugins = ["tests.helpers.workers", "tests.helpers.servers"]


@pytest.fixture(scope="session", params=["embedded", "server"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp(request.param)
    env = {"DISTILL_HOME": str(home), "DISTILL_HEARTBEAT_INTERVAL_S": "0.5"}
    database = None
    if request.param == "server":
        database = f"distill_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin_dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{database}"')
        env["DISTILL_DATABASE_URL"] = POSTGRES_URL.rsplit("/", 1)[0] + f"/{database}"
        env["DISTILL_BROKER_URL"] = REDIS_URL
        redis.Redis.from_url(REDIS_URL).flushdb()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("DISTILL_DATABASE_URL", "DISTILL_BROKER_URL"):
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        clear_caches()
        from app.cli import migrate

        migrate()
        api_key, tenant_id = None, DEFAULT_TENANT_ID
        if get_settings().auth_required:
            with db.session_scope() as session:
                key, api_key = create_key(session, "tests", KeyRole.ADMIN, name="test suite")
                tenant_id = key.tenant_id
            mp.setenv("DISTILL_API_KEY", api_key)
        yield Stack(request.param, env, home, api_key, tenant_id)
        db.get_engine().dispose()
        clear_caches()
    if database:
        with psycopg.connect(admin_dsn(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE "{database}" WITH (FORCE)')


@pytest.fixture
def client(stack: Stack) -> Iterator[TestClient]:
    """A client of the API, sending the stack's key; the tenants' rows are deleted after the
    test (the tenants and keys stay)."""
    from app.main import create_app

    with TestClient(create_app(), headers=stack.headers) as test_client:
        yield test_client
    with db.session_scope() as session:
        for table in reversed(Base.metadata.sorted_tables):
            if table.name not in KEPT_TABLES:
                session.execute(delete(table))


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> TeacherFiles:
    """A small MLP teacher."""
    return train_digits_teacher(MlpSpec(hidden_sizes=[64]), tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def digits_cnn_teacher(tmp_path_factory: pytest.TempPathFactory) -> TeacherFiles:
    """A small CNN teacher whose ONNX graph also outputs its block's feature map [16, 4, 4]."""
    return train_digits_teacher(
        CnnSpec(channels=[16], hidden_sizes=[32]), tmp_path_factory.mktemp("cnn"), "3"
    )


@pytest.fixture(scope="session")
def text_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT sentiment classifier (labels `negative`, `positive`) trained on
    ``synthetic_sentiment(512, 0)``, as ``save_pretrained`` writes it, with its tokenizer."""
    return tiny_bert_dir(
        tmp_path_factory.mktemp("text-teacher") / "model",
        id2label={0: "negative", 1: "positive"},
        train_on=synthetic_sentiment(512, 0),
    )


@pytest.fixture(scope="session")
def text_teacher_zip(text_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``text_teacher_dir`` zipped, as a Hugging Face teacher is uploaded."""
    return zip_dir(text_teacher_dir, tmp_path_factory.mktemp("text-teacher-zip") / "teacher.zip")
