"""Job submission and control, without a worker: what is checked before queueing."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from app.jobs.schemas import JobResult
from app.ml.signature import ModelSignature
from app.ml.students import MlpSpec, build_model
from tests.helpers.api import job_body, npz_bytes, upload_teacher
from tests.helpers.teachers import TeacherFiles


@pytest.fixture
def teacher_id(client: TestClient, digits_teacher: TeacherFiles) -> object:
    return upload_teacher(client, digits_teacher)["id"]


def test_submit_returns_202_with_location(client: TestClient, teacher_id: object) -> None:
    response = client.post("/v1/jobs", json=job_body(teacher_id))
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert (job["status"], job["phase"], job["attempt"]) == ("queued", "queued", 0)
    stored = client.get(response.headers["location"]).json()
    assert stored["spec"]["distillation"] == {"method": "kd", "temperature": 4.0, "alpha": 0.9}
    assert client.get(f"/v1/jobs/{job['id']}/metrics").json() == {"items": []}


def test_defaults_fill_everything_but_teacher_dataset_student(
    client: TestClient, teacher_id: object
) -> None:
    body = {"teacher": teacher_id, "dataset": "builtin:digits", "student": {"architecture": "mlp"}}
    spec = client.post("/v1/jobs", json=body).json()["spec"]
    expected = {"epochs": 5, "batch_size": 128, "learning_rate": 0.001, "seed": 0}
    assert spec["training"].items() >= expected.items()
    assert spec["training"]["schedule"] == "constant" and spec["training"]["optimizer"] == "adam"
    assert spec["student"]["hidden_sizes"] == [128]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"distillation": {"method": "kd", "temperature": 0}}, "distillation.kd.temperature"),
        ({"distillation": {"method": "kd", "alpha": 1.5}}, "distillation.kd.alpha"),
        ({"distillation": {"method": "magic"}}, "distillation"),
        ({"student": {"architecture": "lstm"}}, "student"),
        ({"student": {"architecture": "mlp", "hidden_sizes": [0]}}, "student.mlp.hidden_sizes.0"),
        ({"training": {"epochs": 0}}, "training.epochs"),
        ({"training": {"batch_size": -1}}, "training.batch_size"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_invalid_spec_names_the_field(
    client: TestClient, teacher_id: object, overrides: dict[str, object], field: str
) -> None:
    response = client.post("/v1/jobs", json=job_body(teacher_id, **overrides))
    assert response.status_code == 422
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert problem["code"] == "validation_error"
    assert problem["field"] == field


def test_unknown_teacher_and_dataset(client: TestClient, teacher_id: object) -> None:
    response = client.post("/v1/jobs", json=job_body("no-such-teacher"))
    assert (response.status_code, response.json()["field"]) == (422, "teacher")
    response = client.post("/v1/jobs", json=job_body(teacher_id, dataset="builtin:imagenet"))
    assert (response.status_code, response.json()["field"]) == (422, "dataset")
    response = client.post("/v1/jobs", json=job_body(teacher_id, dataset="no-such-dataset"))
    assert (response.status_code, response.json()["field"]) == (422, "dataset")


@pytest.mark.parametrize("shape", [(1, 28, 28), (64,), (8, 8)])
def test_dataset_shape_must_match_teacher(
    client: TestClient, teacher_id: object, shape: tuple[int, ...]
) -> None:
    x = np.zeros((20, *shape), dtype=np.float32)
    upload = npz_bytes(x=x, y=np.arange(20) % 10)
    dataset = client.post("/v1/datasets", files={"file": ("d.npz", upload)}).json()["ref"]
    response = client.post("/v1/jobs", json=job_body(teacher_id, dataset=dataset))
    assert response.status_code == 422
    problem = response.json()
    assert (problem["code"], problem["field"]) == ("invalid_spec", "dataset")
    assert str(list(shape)) in problem["detail"] and "[1, 8, 8]" in problem["detail"]


def test_dataset_classes_must_fit_teacher_outputs(client: TestClient, teacher_id: object) -> None:
    x = np.zeros((20, 1, 8, 8), dtype=np.float32)
    y = np.arange(20) % 12  # 12 classes; the teacher has 10 outputs
    upload = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(x=x, y=y))})
    response = client.post("/v1/jobs", json=job_body(teacher_id, dataset=upload.json()["ref"]))
    assert response.status_code == 422
    assert "12 classes" in response.json()["detail"]


def test_cnn_student_on_images_is_accepted(client: TestClient, teacher_id: object) -> None:
    body = job_body(teacher_id, student={"architecture": "cnn", "channels": [4]})
    assert client.post("/v1/jobs", json=body).status_code == 202


def test_cancel_a_queued_job(client: TestClient, teacher_id: object) -> None:
    job_id = client.post("/v1/jobs", json=job_body(teacher_id)).json()["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert again.json()["job_status"] == "cancelled"


def test_student_is_not_served_before_success(client: TestClient, teacher_id: object) -> None:
    job_id = client.post("/v1/jobs", json=job_body(teacher_id)).json()["id"]
    predict = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": [[[[0.0] * 8] * 8]]})
    assert predict.status_code == 409
    assert predict.json()["code"] == "job_not_ready"
    assert client.get(f"/v1/jobs/{job_id}/artifact").status_code == 409
    assert client.get("/v1/jobs/nope/artifact").status_code == 404


def test_list_is_paginated_and_filtered(client: TestClient, teacher_id: object) -> None:
    ids = [client.post("/v1/jobs", json=job_body(teacher_id)).json()["id"] for _ in range(3)]
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert (page["total"], len(page["items"])) == (3, 2)
    rest = client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
    assert {j["id"] for j in page["items"] + rest["items"]} == set(ids)
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in cancelled["items"]] == [ids[0]]
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_unknown_job_is_problem_json(client: TestClient) -> None:
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/metrics"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
    assert client.post("/v1/jobs/nope/cancel").status_code == 404


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    "method",
    [
        {"method": "kd", "temperature": 1.0, "alpha": 0.5},
        {"method": "mse"},
        {"method": "dkd", "temperature": 4.0, "tckd_weight": 1.0, "nckd_weight": 8.0},
        {"method": "dist", "inter_weight": 2.0, "intra_weight": 2.0},
        {"method": "ls_kd"},
        {"method": "forward_kl"},
        {"method": "reverse_kl", "temperature": 2.0},
        {"method": "jsd", "beta": 0.1},
    ],
)
def test_every_method_is_selectable(
    client: TestClient, teacher_id: object, method: dict[str, object]
) -> None:
    response = client.post("/v1/jobs", json=job_body(teacher_id, distillation=method))
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["distillation"]["method"] == method["method"]


@pytest.mark.parametrize(
    ("method", "field"),
    [
        ({"method": "jsd", "beta": 1.0}, "distillation.jsd.beta"),
        ({"method": "dkd", "alpha": 1.0}, "distillation.dkd.alpha"),
        ({"method": "dist", "temperature": -1}, "distillation.dist.temperature"),
    ],
)
def test_method_parameters_are_checked(
    client: TestClient, teacher_id: object, method: dict[str, object], field: str
) -> None:
    response = client.post("/v1/jobs", json=job_body(teacher_id, distillation=method))
    assert response.status_code == 422
    assert response.json()["field"] == field


def test_ensemble_of_teachers(client: TestClient, digits_teacher: TeacherFiles) -> None:
    first = upload_teacher(client, digits_teacher)["id"]
    second = upload_teacher(client, digits_teacher)["id"]
    body = job_body(None, teachers=[{"id": first}, {"id": second, "weight": 3}])
    del body["teacher"]
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["teacher_id"] == first
    assert client.delete(f"/v1/teachers/{second}").status_code == 409  # in use by the job


def test_ensemble_members_may_name_their_inputs_differently(
    client: TestClient, digits_teacher: TeacherFiles, tmp_path: Path
) -> None:
    """Each backend feeds its own input name: only datatypes, shapes and classes must agree."""
    model = onnx.load(str(digits_teacher.onnx))
    old, new = model.graph.input[0].name, "pixels"
    model.graph.input[0].name = new
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
    onnx.save(model, str(tmp_path / "pixels.onnx"))
    renamed = TeacherFiles(tmp_path / "pixels.onnx", digits_teacher.safetensors, {}, 0.0)
    first = upload_teacher(client, renamed)
    assert first["signature"]["inputs"][0]["name"] == "pixels"
    second = upload_teacher(client, digits_teacher)["id"]
    body = job_body(None, teachers=[{"id": first["id"]}, {"id": second}])
    del body["teacher"]
    assert client.post("/v1/jobs", json=body).status_code == 202


def test_ensemble_teachers_must_agree(
    client: TestClient, digits_teacher: TeacherFiles, tmp_path: Path
) -> None:
    first = upload_teacher(client, digits_teacher)["id"]
    five_classes = build_model(MlpSpec(hidden_sizes=[4]), ModelSignature.for_tensor((1, 8, 8), 5))
    save_file(five_classes.state_dict(), str(tmp_path / "five.safetensors"))
    config = {
        "architecture": {"architecture": "mlp", "hidden_sizes": [4]},
        "input_shape": [1, 8, 8],
        "num_classes": 5,
    }
    with open(tmp_path / "five.safetensors", "rb") as f:
        other = client.post(
            "/v1/teachers",
            files={"file": ("five.safetensors", f)},
            data={"config": json.dumps(config)},
        ).json()["id"]
    for teachers in ([{"id": first}, {"id": other}], [{"id": first}, {"id": "missing"}]):
        body = job_body(None, teachers=teachers)
        del body["teacher"]
        response = client.post("/v1/jobs", json=body)
        assert (response.status_code, response.json()["field"]) == (422, "teachers")


@pytest.mark.parametrize("teachers", [None, [{"id": "a"}]])
def test_exactly_one_way_to_name_teachers(
    client: TestClient, teacher_id: object, teachers: object
) -> None:
    body = job_body(teacher_id if teachers is None else None)
    if teachers is None:
        body["teachers"] = [{"id": teacher_id}, {"id": teacher_id}]  # and `teacher` too
    else:
        del body["teacher"]
        body["teachers"] = teachers  # an ensemble of one
    assert client.post("/v1/jobs", json=body).status_code == 422


def test_results_stored_by_the_first_version_are_still_served() -> None:
    """`GET /v1/jobs` validates every stored result: one from before later figures existed must
    not fail the whole page."""
    first_version = {
        "student_accuracy": 0.9,
        "teacher_accuracy": 0.95,
        "accuracy_retained": 94.7,
        "agreement": 0.93,
        "student_parameters": 100,
        "teacher_parameters": 1000,
        "compression_ratio": 10.0,
        "student_size_bytes": 1,
        "teacher_size_bytes": 2,
        "student_latency_ms": 0.1,
        "teacher_latency_ms": 1.0,
        "speedup": 10.0,
        "best_epoch": 3,
        "best_val_accuracy": 0.91,
        "train_samples": 8,
        "val_samples": 1,
        "test_samples": 2,
        "device": "cpu",
        "wall_seconds": 5.0,
    }
    result = JobResult.model_validate(first_version)
    assert result.teachers == [] and result.kl_to_teacher is None and not result.label_free


def test_infinite_numbers_in_a_spec_are_refused(client: TestClient, teacher_id: object) -> None:
    """`1e999` parses as infinity: PostgreSQL's JSON cannot hold it (it was a 500 there)."""
    body = json.dumps(job_body(teacher_id)).replace(
        '"seed": 0', '"seed": 0, "grad_clip_norm": 1e999'
    )
    response = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert (response.status_code, response.json()["field"]) == (422, "training.grad_clip_norm")


def test_a_student_whose_batch_activations_exceed_the_budget_is_refused(
    client: TestClient, teacher_id: object
) -> None:
    """An MLP of 16384-wide layers on batches of 65536 would need about 16 GiB to train."""
    body = job_body(
        teacher_id,
        student={"architecture": "mlp", "hidden_sizes": [16384, 16384]},
        training={"batch_size": 65536},
    )
    response = client.post("/v1/jobs", json=body)
    assert (response.status_code, response.json()["field"]) == (422, "training.batch_size")
    assert "GiB" in response.json()["detail"]
