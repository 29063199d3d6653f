"""Text jobs at submission: what cannot make a meaningful student is a 422 naming the field; a
text student's spec is settled from its teacher's config and stored."""

import csv
import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.helpers.api import upload_teacher
from tests.helpers.teachers import TeacherFiles
from tests.helpers.text_teachers import synthetic_sentiment


def text_dataset(client: TestClient, *, flipped: bool = False) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "label"])
    texts, labels = synthetic_sentiment(60, 3)
    writer.writerows(zip(texts, [1 - y if flipped else y for y in labels], strict=True))
    response = client.post("/v1/datasets", files={"file": ("reviews.csv", out.getvalue())})
    assert response.status_code == 201, response.text
    return str(response.json()["ref"])


@pytest.fixture
def text_teacher(client: TestClient, text_teacher_zip: Path) -> str:
    response = client.post(
        "/v1/teachers", files={"file": ("teacher.zip", text_teacher_zip.read_bytes())}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def submit(
    client: TestClient, teacher: str, dataset: str, **overrides: object
) -> dict[str, object]:
    body: dict[str, object] = {
        "teacher": teacher,
        "dataset": dataset,
        "student": {"architecture": "transformer", "num_layers": 1},
        **overrides,
    }
    response = client.post("/v1/jobs", json=body)
    assert response.headers["content-type"].startswith("application/")
    return {**response.json(), "http": response.status_code}


def test_transformer_layer_methods_store_their_default_pairs(
    client: TestClient, text_teacher: str
) -> None:
    dataset = text_dataset(client)
    job = submit(client, text_teacher, dataset, distillation={"method": "hidden_states"})
    assert job["http"] == 202, job
    stored = client.get(f"/v1/jobs/{job['id']}").json()["spec"]["distillation"]["layers"]
    # TinyBERT's uniform mapping, 2 teacher layers onto 1: embeddings to embeddings, last to last.
    assert stored == [
        {"teacher": "hidden_states.0", "student": "hidden_states.0"},
        {"teacher": "hidden_states.2", "student": "hidden_states.1"},
    ]
    job = submit(client, text_teacher, dataset, distillation={"method": "attention_kl"})
    spec = client.get(f"/v1/jobs/{job['id']}").json()["spec"]
    assert spec["distillation"]["layers"] == [
        {"teacher": "attentions.1", "student": "attentions.0"}
    ]
    # MiniLM matches the softmax itself: the student's attention is trained without dropout.
    assert spec["student"]["attention_dropout"] == 0.0


def test_the_preflight_runs_the_text_teacher_at_submission(
    client: TestClient, text_teacher: str
) -> None:
    job = submit(client, text_teacher, text_dataset(client))
    preflight = client.get(f"/v1/jobs/{job['id']}").json()["preflight"]
    assert preflight["stage"] == "submission"
    assert preflight["teachers"][0]["accuracy"] > 0.9
    # Labels that mean the opposite of the teacher's classes: no student could mean anything.
    refused = submit(client, text_teacher, text_dataset(client, flipped=True))
    assert refused["http"] == 422 and refused["code"] == "teacher_below_chance"


def test_a_text_student_is_settled_from_its_teacher(client: TestClient, text_teacher: str) -> None:
    job = submit(client, text_teacher, text_dataset(client))
    assert job["http"] == 202
    student = client.get(f"/v1/jobs/{job['id']}").json()["spec"]["student"]
    assert student["init"] == "teacher_layers"
    assert student["teacher_layers"] == [1]
    assert (student["hidden_size"], student["num_heads"], student["intermediate_size"]) == (
        32,
        2,
        64,
    )
    assert student["base_config"]["model_type"] == "bert"
    assert "id2label" not in student["base_config"]


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"student": {"architecture": "mlp"}}, "student.architecture", "text"),
        (
            {"student": {"architecture": "transformer", "hidden_size": 10, "num_heads": 4}},
            "student",
            "not a multiple",
        ),
        (
            {
                "student": {
                    "architecture": "transformer",
                    "hidden_size": 16,
                    "init": "teacher_layers",
                }
            },
            "student",
            "teacher's sizes",
        ),
        (
            {"student": {"architecture": "transformer", "num_layers": 2, "teacher_layers": [0, 5]}},
            "student",
            "layers 0..1",
        ),
        (
            {
                "student": {
                    "architecture": "text_cnn",
                    "embedding_dim": 8,
                    "init": "teacher_embeddings",
                }
            },
            "student",
            "embedding_dim 32",
        ),
        ({"distillation": {"method": "fitnets"}}, "distillation.method", "`hidden_states`"),
        (
            {
                "student": {"architecture": "transformer", "num_layers": 1, "num_heads": 4},
                "distillation": {"method": "attention_kl"},
            },
            "distillation.layers",
            "num_heads: 2",
        ),
        (
            {
                "student": {
                    "architecture": "transformer",
                    "num_layers": 1,
                    "attention_dropout": 0.1,
                },
                "distillation": {"method": "attention_kl"},
            },
            "student.attention_dropout",
            "leave `attention_dropout` unset",
        ),
        (
            {
                "distillation": {
                    "method": "hidden_states",
                    "layers": [{"teacher": "attentions.0", "student": "hidden_states.1"}],
                }
            },
            "distillation.layers",
            "hidden_states.0, hidden_states.1, hidden_states.2",
        ),
        (
            {
                "student": {"architecture": "text_cnn"},
                "distillation": {"method": "hidden_states"},
            },
            "student.architecture",
            "`transformer` student",
        ),
    ],
)
def test_what_cannot_be_built_is_refused_at_submission(
    client: TestClient,
    text_teacher: str,
    overrides: dict[str, object],
    field: str,
    words: str,
) -> None:
    job = submit(client, text_teacher, text_dataset(client), **overrides)
    assert job["http"] == 422, job
    assert job["code"] == "invalid_spec"
    assert job["field"] == field
    assert words in str(job["detail"])


def test_text_and_arrays_do_not_mix(
    client: TestClient, text_teacher: str, digits_teacher: TeacherFiles
) -> None:
    image_teacher = str(upload_teacher(client, digits_teacher)["id"])
    job = submit(
        client,
        image_teacher,
        text_dataset(client),
        student={"architecture": "mlp"},
    )
    assert (job["http"], job["field"]) == (422, "dataset")
    assert "text teacher" in str(job["detail"])
    job = submit(client, text_teacher, "builtin:digits")
    assert (job["http"], job["field"]) == (422, "dataset")
    assert "tokenised text" in str(job["detail"])
    job = submit(client, image_teacher, "builtin:digits")
    assert (job["http"], job["field"]) == (422, "student.architecture")
    job = submit(
        client,
        image_teacher,
        "builtin:digits",
        student={"architecture": "mlp"},
        distillation={"method": "hidden_states"},
    )
    assert (job["http"], job["field"]) == (422, "distillation.method")
