"""Fixtures on real parts: a migrated database per stack, an API client, tiny trained teachers.

Two stacks run the same tests: ``embedded`` (SQLite file + filesystem Celery broker) and ``server``
(PostgreSQL + Redis). Each stack gets its own fresh database, built by Alembic.
"""

import io
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from sqlalchemy import delete

from app import config, db, queue, storage
from app.ml.architectures import CnnSpec, MlpSpec, build_model
from app.models import Base

POSTGRES_URL = os.environ.get(
    "DISTILL_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("DISTILL_TEST_REDIS", "redis://127.0.0.1:6379/15")


def clear_caches() -> None:
    for cached in (
        config.get_settings,
        db.get_engine,
        db.get_session_factory,
        storage.get_store,
        queue.get_celery,
    ):
        cached.cache_clear()


@dataclass(frozen=True)
class Stack:
    name: str
    env: dict[str, str]
    home: Path


def _admin_dsn() -> str:
    return POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture(scope="session", params=["embedded", "server"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp(request.param)
    env = {"DISTILL_HOME": str(home), "DISTILL_HEARTBEAT_INTERVAL_S": "0.5"}
    database = None
    if request.param == "server":
        database = f"distill_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(_admin_dsn(), autocommit=True) as connection:
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
        yield Stack(request.param, env, home)
        db.get_engine().dispose()
        clear_caches()
    if database:
        with psycopg.connect(_admin_dsn(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE "{database}" WITH (FORCE)')


@pytest.fixture
def client(stack: Stack) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client
    with db.session_scope() as session:
        for table in reversed(Base.metadata.sorted_tables):
            session.execute(delete(table))


@dataclass(frozen=True)
class TeacherFiles:
    onnx: Path
    safetensors: Path
    config: dict[str, object]
    test_accuracy: float


def train_digits_teacher(
    spec: MlpSpec | CnnSpec, directory: Path, onnx_features: str | None = None
) -> TeacherFiles:
    """Full-batch Adam on digits for a few seconds; saved as ONNX and as safetensors. With
    ``onnx_features`` (a module path), the ONNX graph also outputs that layer as ``features``."""
    from worker.data import load_builtin
    from worker.export import export_onnx

    data = load_builtin("builtin:digits")
    torch.manual_seed(0)
    model = build_model(spec, data.input_shape, 10)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = model(torch.from_numpy(data.x_test)).argmax(-1).numpy()
    if onnx_features is None:
        export_onnx(model, data.input_shape, directory / "teacher.onnx")
    else:
        torch.onnx.export(
            WithFeatures(model, onnx_features).eval(),
            (torch.zeros(2, *data.input_shape),),
            str(directory / "teacher.onnx"),
            input_names=["input"],
            output_names=["logits", "features"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )
    save_file(model.state_dict(), str(directory / "teacher.safetensors"))
    teacher_config = {
        "architecture": spec.model_dump(mode="json"),
        "input_shape": [1, 8, 8],
        "num_classes": 10,
    }
    return TeacherFiles(
        onnx=directory / "teacher.onnx",
        safetensors=directory / "teacher.safetensors",
        config=teacher_config,
        test_accuracy=float((predictions == data.y_test).mean()),
    )


class WithFeatures(torch.nn.Module):
    """A model that returns ``(logits, output of the layer at path)``: how a user exports an
    ONNX teacher whose intermediate features a feature method can match."""

    def __init__(self, model: torch.nn.Module, path: str) -> None:
        super().__init__()
        self.model, self.path = model, path

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = []
        handle = self.model.get_submodule(self.path).register_forward_hook(
            lambda module, args, output: features.append(output)
        )
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return logits, features[0]


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


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def upload_teacher(client: TestClient, teacher: TeacherFiles) -> dict[str, object]:
    with open(teacher.onnx, "rb") as f:
        response = client.post("/v1/teachers", files={"file": ("teacher.onnx", f)})
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    return body


def upload_safetensors_teacher(client: TestClient, teacher: TeacherFiles) -> dict[str, object]:
    with open(teacher.safetensors, "rb") as f:
        response = client.post(
            "/v1/teachers",
            files={"file": ("teacher.safetensors", f)},
            data={"config": json.dumps(teacher.config)},
        )
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    return body


def job_body(teacher_id: object, **overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "teacher": teacher_id,
        "dataset": "builtin:digits",
        "student": {"architecture": "mlp", "hidden_sizes": [32]},
        "training": {"epochs": 3, "batch_size": 64, "learning_rate": 0.01, "seed": 0},
    }
    body.update(overrides)
    return body
