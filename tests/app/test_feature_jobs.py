"""Feature methods at submission: the layers teachers list, defaults resolved into the stored
spec, and the 422s for layers that cannot work."""

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.datasets.service import DatasetSummary
from app.errors import InvalidSpec
from app.jobs.features import resolve_layer_pairs
from app.jobs.methods import SimilarityPreserving
from app.ml.signature import ModelSignature
from app.ml.students import CnnSpec
from app.models import Teacher
from tests.helpers.api import job_body, upload_safetensors_teacher, upload_teacher
from tests.helpers.teachers import TeacherFiles

CNN_STUDENT = {"architecture": "cnn", "channels": [8]}


@pytest.fixture
def cnn_teacher(client: TestClient, digits_cnn_teacher: TeacherFiles) -> dict[str, Any]:
    return upload_safetensors_teacher(client, digits_cnn_teacher)


DIGITS = ModelSignature.for_tensor((1, 8, 8), 10)


def submit(client: TestClient, teacher_id: object, method: dict[str, object], **body: Any) -> Any:
    return client.post(
        "/v1/jobs",
        json=job_body(teacher_id, **{"student": CNN_STUDENT, "distillation": method, **body}),
    )


def test_teachers_list_their_feature_layers(
    client: TestClient,
    cnn_teacher: dict[str, Any],
    digits_cnn_teacher: TeacherFiles,
    digits_teacher: TeacherFiles,
) -> None:
    layers = cnn_teacher["feature_layers"]
    assert [(layer["name"], layer["kind"]) for layer in layers] == [
        ("0", "Conv2d"),
        ("1", "BatchNorm2d"),
        ("2", "ReLU"),
        ("3", "MaxPool2d"),
        ("4", "Flatten"),
        ("5", "Linear"),
        ("6", "ReLU"),
    ]  # not "7": the last layer's outputs are the logits
    assert layers[3]["shape"] == [16, 4, 4] and layers[6]["shape"] == [32]
    onnx_teacher = upload_teacher(client, digits_cnn_teacher)
    assert onnx_teacher["feature_layers"] == [
        {"name": "features", "shape": [16, 4, 4], "kind": None}
    ]
    assert upload_teacher(client, digits_teacher)["feature_layers"] == []


@pytest.mark.parametrize(
    ("method", "teacher_layer", "student_layer"),
    [
        ({"method": "fitnets"}, "3", "3"),  # the last feature map of each
        ({"method": "at", "weight": 500}, "3", "3"),
        ({"method": "sp"}, "6", "4"),  # what each classifier reads
        ({"method": "rkd", "angle_weight": 0, "alpha": 0.5}, "6", "4"),
    ],
)
def test_feature_methods_are_selectable_with_default_layers(
    client: TestClient,
    cnn_teacher: dict[str, Any],
    method: dict[str, object],
    teacher_layer: str,
    student_layer: str,
) -> None:
    response = submit(client, cnn_teacher["id"], method)
    assert response.status_code == 202, response.text
    stored = response.json()["spec"]["distillation"]
    assert stored["method"] == method["method"]
    assert stored["layers"] == [{"teacher": teacher_layer, "student": student_layer}]


def test_explicit_layers_are_kept(client: TestClient, cnn_teacher: dict[str, Any]) -> None:
    layers = [{"teacher": "6", "student": "4"}, {"teacher": "3", "student": "3"}]
    response = submit(client, cnn_teacher["id"], {"method": "sp", "layers": layers})
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["distillation"]["layers"] == layers


@pytest.mark.parametrize(
    ("method", "student", "message"),
    [
        ({"method": "at"}, {"architecture": "mlp"}, "the student has none"),
        (
            {"method": "fitnets", "layers": [{"teacher": "3", "student": "nope"}]},
            CNN_STUDENT,
            "The student has no layer 'nope'; it has: 0 [8, 8, 8]",
        ),
        (
            {"method": "at", "layers": [{"teacher": "3", "student": "0"}]},
            CNN_STUDENT,
            "same H x W",
        ),
        (
            {"method": "fitnets", "layers": [{"teacher": "3", "student": "4"}]},
            CNN_STUDENT,
            "two vectors",
        ),
    ],
)
def test_layers_that_cannot_work_are_422(
    client: TestClient,
    cnn_teacher: dict[str, Any],
    method: dict[str, object],
    student: dict[str, object],
    message: str,
) -> None:
    response = submit(client, cnn_teacher["id"], method, student=student)
    assert response.status_code == 422
    problem = response.json()
    assert problem["field"] == "distillation.layers"
    assert message in problem["detail"]


def test_onnx_teacher_without_extra_outputs_is_422(
    client: TestClient, digits_teacher: TeacherFiles
) -> None:
    teacher = upload_teacher(client, digits_teacher)
    response = submit(client, teacher["id"], {"method": "sp"})
    assert response.status_code == 422
    assert response.json()["field"] == "teacher"
    assert "extra graph outputs" in response.json()["detail"]


def test_onnx_teacher_extra_outputs_are_its_layers(
    client: TestClient, digits_cnn_teacher: TeacherFiles
) -> None:
    teacher = upload_teacher(client, digits_cnn_teacher)
    response = submit(client, teacher["id"], {"method": "at"})
    assert response.status_code == 202, response.text
    stored = response.json()["spec"]["distillation"]["layers"]
    assert stored == [{"teacher": "features", "student": "3"}]


def test_feature_methods_take_one_teacher(
    client: TestClient, cnn_teacher: dict[str, Any], digits_cnn_teacher: TeacherFiles
) -> None:
    other = upload_safetensors_teacher(client, digits_cnn_teacher)["id"]
    body = job_body(
        None,
        teachers=[{"id": cnn_teacher["id"]}, {"id": other}],
        student=CNN_STUDENT,
        distillation={"method": "fitnets"},
    )
    del body["teacher"]
    response = client.post("/v1/jobs", json=body)
    assert (response.status_code, response.json()["field"]) == (422, "teachers")


def test_teacher_outputs_beyond_the_memory_budget_are_refused() -> None:
    teacher = Teacher(
        id="t",
        format="onnx",
        signature=DIGITS.model_dump(mode="json"),
        feature_layers=[{"name": "features", "shape": [16, 4, 4]}],
    )
    dataset = DatasetSummary("builtin:digits", DIGITS, train_size=1000)
    method, student = SimilarityPreserving(method="sp"), CnnSpec(channels=[8])
    needed = 1000 * 16 * 4 * 4 * 4  # samples x values x float32 bytes
    assert resolve_layer_pairs(method, teacher, student, dataset, needed)[0].teacher == "features"
    with pytest.raises(InvalidSpec, match="Choose a smaller"):
        resolve_layer_pairs(method, teacher, student, dataset, needed - 1)


def test_teachers_from_before_layer_listing_are_told_to_upload_again() -> None:
    teacher = Teacher(id="t", format="onnx", signature=DIGITS.model_dump(mode="json"))
    dataset = DatasetSummary("builtin:digits", DIGITS, train_size=1000)
    with pytest.raises(InvalidSpec, match="upload it again"):
        resolve_layer_pairs(
            SimilarityPreserving(method="sp"), teacher, CnnSpec(channels=[8]), dataset, 2**30
        )
