"""Requests the API tests make again and again: uploads and job bodies."""

import io
import json

import numpy as np
from fastapi.testclient import TestClient

from tests.helpers.teachers import TeacherFiles


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def upload_teacher(
    client: TestClient, teacher: TeacherFiles, headers: dict[str, str] | None = None
) -> dict[str, object]:
    with open(teacher.onnx, "rb") as f:
        response = client.post("/v1/teachers", files={"file": ("teacher.onnx", f)}, headers=headers)
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    assert response.headers["location"] == f"/v1/teachers/{body['id']}"
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
