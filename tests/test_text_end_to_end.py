"""Text end to end with a real Celery worker, on both stacks: a Hugging Face teacher uploaded as
a zip, a CSV dataset with named labels, a transformer student started from the teacher's layers;
`/predict` on raw sentences reproduces the reported accuracy, and Triton's own client sends the
sentences as BYTES to `/v2`."""

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers.servers import serving, v2_client
from tests.helpers.stacks import key_headers
from tests.helpers.text_teachers import synthetic_sentiment
from tests.helpers.workers import StartWorker, is_terminal, wait_for

pytestmark = pytest.mark.e2e
CLASSES = ["negative", "positive"]


def csv_bytes(texts: list[str], labels: list[int]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["sentence", "label"])
    writer.writerows([text, CLASSES[label]] for text, label in zip(texts, labels, strict=True))
    return out.getvalue().encode()


def test_text_job_end_to_end(
    client: TestClient, text_teacher_zip: Path, start_worker: StartWorker
) -> None:
    teacher = client.post(
        "/v1/teachers", files={"file": ("teacher.zip", text_teacher_zip.read_bytes())}
    )
    assert teacher.status_code == 201, teacher.text
    assert teacher.json()["format"] == "huggingface"
    train, test = synthetic_sentiment(600, 1), synthetic_sentiment(200, 2)
    dataset = client.post(
        "/v1/datasets",
        files={
            "file": ("train.csv", csv_bytes(*train)),
            "test_file": ("test.csv", csv_bytes(*test)),
        },
    )
    assert dataset.status_code == 201, dataset.text
    start_worker()
    submitted = client.post(
        "/v1/jobs",
        json={
            "teacher": teacher.json()["id"],
            "dataset": dataset.json()["ref"],
            "student": {"architecture": "transformer", "num_layers": 1},
            "training": {"epochs": 3, "batch_size": 32, "learning_rate": 0.002, "seed": 0},
        },
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    # The spec as stored says what the student took from its teacher.
    student = client.get(f"/v1/jobs/{job_id}").json()["spec"]["student"]
    assert student["init"] == "teacher_layers" and student["teacher_layers"] == [1]
    job = wait_for(client, job_id, is_terminal, timeout=300)
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert isinstance(result, dict)
    assert result["teacher_accuracy"] > 0.9 and result["student_accuracy"] > 0.85
    assert "teacher layers [1]" in result["student_init"]

    texts, labels = test
    predicted = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": texts})
    assert predicted.status_code == 200, predicted.text
    body = predicted.json()
    served = np.mean([name == CLASSES[y] for name, y in zip(body["labels"], labels, strict=True)])
    assert served == pytest.approx(result["student_accuracy"])

    # Empty, non-ASCII and over-long texts are records like any other (cut at max_length).
    odd = client.post(
        f"/v1/jobs/{job_id}/predict",
        json={"inputs": ["", "très bien, 日本語 😀", "the movie was good " * 2000]},
    )
    assert odd.status_code == 200, odd.text
    assert len(odd.json()["predictions"]) == 3
    wrong = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": [[0.5, 1.0]]})
    assert wrong.status_code == 422
    assert wrong.headers["content-type"] == "application/problem+json"
    assert client.get(f"/v1/jobs/{job_id}/artifact", params={"format": "tokenizer"}).json()[
        "model"
    ]["type"] in ("WordPiece", "WordLevel", "BPE", "Unigram")

    with serving(create_app()) as address:
        triton_client = v2_client(address, key_headers())
        metadata = triton_client.get_model_metadata(job_id)
        assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        tensor = triton.InferInput("text", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(
            np.array([t.encode() for t in texts], dtype=object), binary_data=False
        )
        response = triton_client.infer(
            job_id,
            [tensor],
            outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)],
        )
        probabilities = response.as_numpy("probabilities")
        assert probabilities is not None
        assert probabilities.argmax(axis=1).tolist() == body["predictions"]
        assert np.allclose(probabilities, np.asarray(body["probabilities"]), atol=1e-5)
