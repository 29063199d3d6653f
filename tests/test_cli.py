"""The ``distill`` client commands against a real API (uvicorn) and a real Celery worker, on both
stacks: upload, submit and watch, list, show, metrics, download, predict, cancel; ``--json``
output and exit codes."""

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner, Result

from app.cli import EXIT_API_ERROR, EXIT_JOB_CANCELLED, app
from app.datasets.loading import load_builtin
from tests.helpers.api import job_body, npz_bytes
from tests.helpers.servers import serving
from tests.helpers.teachers import TeacherFiles
from tests.helpers.workers import StartWorker

pytestmark = pytest.mark.e2e


@pytest.fixture
def url(client: TestClient) -> Iterator[str]:
    """The API served over HTTP on the test's stack (``client`` empties the tables after)."""
    from app.main import create_app

    with serving(create_app()) as address:
        yield f"http://{address}"


def distill(url: str, *args: str) -> Result:
    """``distill ARGS --url URL``, in process."""
    return CliRunner().invoke(app, [*args, "--url", url])


def as_json(result: Result) -> object:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_upload_submit_watch_and_use_the_student(
    url: str, digits_teacher: TeacherFiles, start_worker: StartWorker, tmp_path: Path
) -> None:
    start_worker()
    teacher = as_json(distill(url, "teachers", "upload", str(digits_teacher.onnx), "--json"))
    assert isinstance(teacher, dict) and teacher["format"] == "onnx"
    listed = distill(url, "teachers", "list")
    assert listed.exit_code == 0 and teacher["id"] in listed.stdout
    shown = distill(url, "teachers", "show", teacher["id"])
    assert shown.exit_code == 0 and teacher["sha256"] in shown.stdout

    data = load_builtin("builtin:digits")
    dataset_file = tmp_path / "digits.npz"
    dataset_file.write_bytes(npz_bytes(x=data.x_train, y=data.y_train))
    dataset = as_json(distill(url, "datasets", "upload", str(dataset_file), "--json"))
    assert isinstance(dataset, dict) and dataset["num_classes"] == 10
    datasets = as_json(distill(url, "datasets", "list", "--json"))
    assert isinstance(datasets, list)
    assert {"builtin:digits", dataset["ref"]} <= {d["ref"] for d in datasets}

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(job_body("replaced by --teacher")))
    watched = distill(url, "jobs", "submit", str(spec), "--teacher", teacher["id"], "--watch")
    assert watched.exit_code == 0, watched.output
    assert "teacher vs student" in watched.stdout and "test accuracy" in watched.stdout
    job_id = watched.stdout.split()[1]

    job = as_json(distill(url, "jobs", "show", job_id, "--json"))
    assert isinstance(job, dict) and job["status"] == "succeeded"
    assert f"{job['result']['student_accuracy']:.4f}" in watched.stdout
    page = as_json(distill(url, "jobs", "list", "--status", "succeeded", "--json"))
    assert isinstance(page, dict) and [j["id"] for j in page["items"]] == [job_id]
    metrics = as_json(distill(url, "jobs", "metrics", job_id, "--json"))
    assert isinstance(metrics, list) and [m["epoch"] for m in metrics] == [1, 2, 3]
    assert "val_accuracy" in distill(url, "jobs", "metrics", job_id).stdout

    artifact = as_json(distill(url, "download", job_id, "-o", str(tmp_path), "--json"))
    assert isinstance(artifact, dict)
    onnx = Path(artifact["path"])
    assert onnx.parent == tmp_path and onnx.name == f"{job_id}-model.onnx"
    assert hashlib.sha256(onnx.read_bytes()).hexdigest() == artifact["sha256"]
    manifest = tmp_path / "manifest.json"
    fetched = distill(url, "download", job_id, "--format", "manifest", "-o", str(manifest))
    assert fetched.exit_code == 0 and json.loads(manifest.read_text())["format_version"] == 2

    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"inputs": data.x_test[:20].tolist()}))
    answer = as_json(distill(url, "predict", job_id, str(inputs), "--json"))
    assert isinstance(answer, dict)
    accuracy = (np.array(answer["predictions"]) == data.y_test[:20]).mean()
    assert accuracy > 0.7 and len(answer["probabilities"]) == 20
    assert distill(url, "predict", job_id, str(inputs)).stdout.count("\n") > 20

    # The teacher is used by a finished job only: it may go.
    assert distill(url, "teachers", "rm", teacher["id"]).exit_code == 0
    missing = distill(url, "teachers", "show", teacher["id"])
    assert missing.exit_code == EXIT_API_ERROR and "not_found" in missing.stderr


def test_cancel_watch_and_errors(
    url: str, digits_teacher: TeacherFiles, client: TestClient, tmp_path: Path
) -> None:
    """No worker: a job stays queued, so a cancel ends it at once."""
    teacher = client.post(
        "/v1/teachers", files={"file": ("t.onnx", digits_teacher.onnx.read_bytes())}
    ).json()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(job_body(teacher["id"])))
    job = as_json(distill(url, "jobs", "submit", str(spec), "--json"))
    assert isinstance(job, dict) and job["status"] == "queued"

    cancelled = distill(url, "jobs", "cancel", job["id"])
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout
    watched = distill(url, "jobs", "watch", job["id"], "--json")
    assert watched.exit_code == EXIT_JOB_CANCELLED
    assert json.loads(watched.stdout)["status"] == "cancelled"

    again = distill(url, "jobs", "cancel", job["id"], "--json")
    assert again.exit_code == EXIT_API_ERROR
    # The last line: the server in this process logs to stderr too.
    problem = json.loads(again.stderr.splitlines()[-1])
    assert problem["status"] == 409 and problem["code"]
    not_ready = distill(url, "download", job["id"])
    assert not_ready.exit_code == EXIT_API_ERROR and "job_not_ready" in not_ready.stderr

    refused = tmp_path / "refused.json"
    refused.write_text(json.dumps(job_body(teacher["id"], dataset="builtin:nope")))
    invalid = distill(url, "jobs", "submit", str(refused))
    assert invalid.exit_code == EXIT_API_ERROR and "422" in invalid.stderr

    assert distill(url, "jobs", "submit", str(tmp_path / "missing.json")).exit_code == 2
    assert distill(url, "jobs", "list", "--limit", "0").exit_code == 2
    unreachable = CliRunner().invoke(
        app, ["jobs", "list"], env={"DISTILL_URL": "http://127.0.0.1:9"}
    )
    assert unreachable.exit_code == EXIT_API_ERROR and "cannot reach" in unreachable.stderr
