"""Teacher uploads: accepted formats, and everything that must be refused without running it."""

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app import db
from app.storage import get_store
from app.teachers import service
from tests.helpers.api import upload_safetensors_teacher, upload_teacher
from tests.helpers.stacks import Stack
from tests.helpers.teachers import TeacherFiles


class WritesAFileWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_onnx_teacher_is_inspected(client: TestClient, digits_teacher: TeacherFiles) -> None:
    body = upload_teacher(client, digits_teacher)
    assert body["format"] == "onnx"
    assert body["input_shape"] == [1, 8, 8]
    assert body["num_classes"] == 10
    assert body["parameter_count"] == 64 * 64 + 64 + 64 * 10 + 10
    assert len(str(body["sha256"])) == 64
    assert client.get(f"/v1/teachers/{body['id']}").json()["sha256"] == body["sha256"]
    assert [t["id"] for t in client.get("/v1/teachers").json()["items"]] == [body["id"]]


def test_safetensors_teacher_with_config(client: TestClient, digits_teacher: TeacherFiles) -> None:
    body = upload_safetensors_teacher(client, digits_teacher)
    assert body["format"] == "safetensors"
    assert body["parameter_count"] == 4810


def test_safetensors_that_do_not_fit_the_config(
    client: TestClient, digits_teacher: TeacherFiles
) -> None:
    wrong = {**digits_teacher.config, "architecture": {"architecture": "mlp", "hidden_sizes": [65]}}
    with open(digits_teacher.safetensors, "rb") as f:
        response = client.post(
            "/v1/teachers", files={"file": ("t.safetensors", f)}, data={"config": json.dumps(wrong)}
        )
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_model"
    assert "do not fit" in response.json()["detail"]


def test_safetensors_without_config(client: TestClient, digits_teacher: TeacherFiles) -> None:
    with open(digits_teacher.safetensors, "rb") as f:
        response = client.post("/v1/teachers", files={"file": ("t.safetensors", f)})
    assert response.status_code == 422
    assert "config" in response.json()["detail"]


def test_pickle_is_refused_and_never_loaded(client: TestClient, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(WritesAFileWhenUnpickled(marker))
    response = client.post("/v1/teachers", files={"file": ("model.pkl", payload)})
    assert response.status_code == 415
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "pickle_refused"
    assert "torch.onnx.export" in problem["detail"]
    assert "safetensors" in problem["detail"]
    assert not marker.exists()
    assert client.get("/v1/teachers").json()["items"] == []


def test_torch_save_checkpoint_is_refused(client: TestClient, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(3), "hook": WritesAFileWhenUnpickled(marker)}, buffer)
    response = client.post("/v1/teachers", files={"file": ("model.pt", buffer.getvalue())})
    assert response.status_code == 415
    assert response.json()["code"] == "pickle_refused"
    assert not marker.exists()


def test_torchscript_is_refused(client: TestClient) -> None:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buffer)
    response = client.post("/v1/teachers", files={"file": ("model.pt", buffer.getvalue())})
    assert response.status_code == 415
    assert "TorchScript" in response.json()["detail"]


def test_truncated_onnx_is_refused(client: TestClient, digits_teacher: TeacherFiles) -> None:
    data = digits_teacher.onnx.read_bytes()
    response = client.post("/v1/teachers", files={"file": ("t.onnx", data[: len(data) // 2])})
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_model"
    assert client.get("/v1/teachers").json()["items"] == []


def test_other_zip_is_refused(client: TestClient) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "hello")
    response = client.post("/v1/teachers", files={"file": ("x.zip", buffer.getvalue())})
    assert response.status_code == 415


def test_unknown_teacher_is_404(client: TestClient) -> None:
    response = client.get("/v1/teachers/nope")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_delete_teacher(stack: Stack, client: TestClient, digits_teacher: TeacherFiles) -> None:
    teacher_id = upload_teacher(client, digits_teacher)["id"]
    tenant_id = stack.tenant_id
    with db.session_scope() as session:
        path = get_store().path(service.get_teacher(session, tenant_id, teacher_id).storage_key)
    assert path.exists()
    with pytest.raises(RuntimeError), db.session_scope() as session:
        service.delete_teacher(
            session, tenant_id=tenant_id, store=get_store(), teacher_id=teacher_id
        )
        raise RuntimeError("the commit fails")
    assert path.exists()  # rolled back: the row and its file are both still there
    assert client.get(f"/v1/teachers/{teacher_id}").status_code == 200
    assert client.delete(f"/v1/teachers/{teacher_id}").status_code == 204
    assert client.get(f"/v1/teachers/{teacher_id}").status_code == 404
    assert not path.exists()


def test_huge_config_is_refused_without_allocating(
    client: TestClient, digits_teacher: TeacherFiles
) -> None:
    # 16 hidden layers of 16,384 units would be ~17 GB of float32: checked on the meta device.
    config = {
        **digits_teacher.config,
        "architecture": {"architecture": "mlp", "hidden_sizes": [16_384] * 16},
    }
    with open(digits_teacher.safetensors, "rb") as f:
        response = client.post(
            "/v1/teachers",
            files={"file": ("t.safetensors", f)},
            data={"config": json.dumps(config)},
        )
    assert response.status_code == 422
    assert "do not fit" in response.json()["detail"]


def test_fake_zip_is_not_a_500(client: TestClient) -> None:
    # An end-of-archive record and nothing else: zipfile.is_zipfile says yes, ZipFile says no.
    fake = b"junk" + b"PK\x05\x06" + b"\x00" * 16 + b"\xff\xff"
    response = client.post("/v1/teachers", files={"file": ("model.onnx", fake)})
    assert response.status_code in (415, 422)


def test_long_names_are_kept_within_bounds(
    client: TestClient, digits_teacher: TeacherFiles
) -> None:
    with open(digits_teacher.onnx, "rb") as f:
        response = client.post("/v1/teachers", files={"file": ("a" * 400 + ".onnx", f)})
    assert response.status_code == 201
    assert len(response.json()["name"]) == 255
