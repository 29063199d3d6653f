"""End to end with a real Celery worker process, on both stacks: submit over HTTP, train, download,
predict; cancel a running job; kill a worker mid-job and see the job finish on a new one."""

import hashlib
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from app.datasets.loading import load_builtin
from app.storage import get_store, keys
from tests.helpers.api import job_body, npz_bytes, upload_safetensors_teacher, upload_teacher
from tests.helpers.stacks import REDIS_URL, Stack
from tests.helpers.teachers import TeacherFiles
from tests.helpers.workers import StartWorker, is_terminal, wait_for

pytestmark = pytest.mark.e2e


def test_job_runs_end_to_end(
    client: TestClient, digits_teacher: TeacherFiles, start_worker: StartWorker
) -> None:
    # Earlier tests on this stack may have cached this teacher's outputs: start without them.
    get_store().delete_tree(keys.TEACHER_CACHE)
    start_worker()
    teacher = upload_teacher(client, digits_teacher)
    body = job_body(teacher["id"], training={"epochs": 6, "batch_size": 32, "learning_rate": 0.01})
    job_id = client.post("/v1/jobs", json=body).json()["id"]
    seen = set()

    def record(job: dict[str, object]) -> bool:
        seen.add(job["status"])
        return is_terminal(job)

    job = wait_for(client, job_id, record)
    assert job["status"] == "succeeded", job["error"]
    assert {"queued", "running", "succeeded"} >= seen and "succeeded" in seen
    assert job["attempt"] == 1 and job["progress"] == 1.0

    result = job["result"]
    assert isinstance(result, dict)
    assert result["teacher_accuracy"] == pytest.approx(digits_teacher.test_accuracy, abs=1e-6)
    assert result["student_accuracy"] > 0.8
    assert result["student_parameters"] == 64 * 32 + 32 + 32 * 10 + 10
    assert result["teacher_parameters"] == teacher["parameter_count"]
    assert result["compression_ratio"] == pytest.approx(
        teacher["parameter_count"] / result["student_parameters"]
    )
    assert result["accuracy_retained"] == pytest.approx(
        100 * result["student_accuracy"] / result["teacher_accuracy"]
    )
    assert result["student_latency_ms"] > 0 and result["teacher_latency_ms"] > 0
    assert result["teacher_outputs_cached"] is False and result["resumed_from_epoch"] is None
    # One pool process: torch takes all the cores it may use.
    assert result["cpu_threads"] == len(os.sched_getaffinity(0))
    assert len(result["student_per_class_accuracy"]) == 10
    assert 0 <= result["student_ece"] <= 1 and result["kl_to_teacher"] > 0

    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]
    assert [m["epoch"] for m in metrics] == list(range(1, 7))
    assert {
        "train_loss",
        "train_kd_loss",
        "train_ce_loss",
        "val_accuracy",
        "val_agreement",
        "val_kl_to_teacher",
        "val_ece",
        "teacher_val_accuracy",
    } <= set(metrics[0]["values"])
    assert job["latest_metrics"]["epoch"] == 6

    for fmt in ("onnx", "safetensors", "manifest"):
        download = client.get(f"/v1/jobs/{job_id}/artifact", params={"format": fmt})
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == download.headers["x-content-sha256"]
    manifest = client.get(f"/v1/jobs/{job_id}/artifact", params={"format": "manifest"}).json()
    assert manifest["format_version"] == 2
    assert manifest["signature"]["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [1, 8, 8]}
    ]
    assert manifest["signature"]["outputs"][0]["classes"] == [str(i) for i in range(10)]
    assert manifest["teachers"] == [
        {"id": teacher["id"], "sha256": teacher["sha256"], "format": "onnx", "weight": 1.0}
    ]
    onnx_bytes = client.get(f"/v1/jobs/{job_id}/artifact").content
    assert manifest["files"]["model.onnx"] == hashlib.sha256(onnx_bytes).hexdigest()

    data = load_builtin("builtin:digits")
    response = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": data.x_test.tolist()})
    assert response.status_code == 200
    predicted = np.array(response.json()["predictions"])
    assert (predicted == data.y_test).mean() == pytest.approx(result["student_accuracy"], abs=1e-6)
    probabilities = np.array(response.json()["probabilities"])
    assert probabilities.shape == (len(data.x_test), 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)

    # Label-free, from an ensemble: an unlabelled transfer set (with a labelled test split), and
    # the ONNX teacher together with the same network uploaded as safetensors.
    transfer = npz_bytes(x=data.x_train, x_test=data.x_test, y_test=data.y_test)
    dataset = client.post("/v1/datasets", files={"file": ("transfer.npz", transfer)}).json()
    assert dataset["labelled"] is False
    twin = upload_safetensors_teacher(client, digits_teacher)
    ensemble = {k: v for k, v in body.items() if k != "teacher"}
    ensemble |= {
        "dataset": dataset["ref"],
        "teachers": [{"id": teacher["id"], "weight": 1.0}, {"id": twin["id"], "weight": 3.0}],
    }
    label_free = client.post("/v1/jobs", json=ensemble).json()
    label_free = wait_for(client, label_free["id"], is_terminal)
    assert label_free["status"] == "succeeded", label_free["error"]
    result = label_free["result"]
    assert result["label_free"] is True
    assert result["student_accuracy"] > 0.8
    assert [t["weight"] for t in result["teachers"]] == [0.25, 0.75]
    # Twins: the ensemble predicts what each of them does.
    assert result["teacher_accuracy"] == pytest.approx(digits_teacher.test_accuracy, abs=1e-6)
    assert result["teacher_parameters"] == 2 * teacher["parameter_count"]

    wrong = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": [[0.0] * 64]})
    assert wrong.status_code == 422 and wrong.json()["expected_shape"] == [1, 8, 8]
    ragged = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": [[1.0], [1.0, 2.0]]})
    assert ragged.status_code == 422
    text = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": [["a"] * 8]})
    assert text.status_code == 422


def test_feature_methods_end_to_end(
    client: TestClient, digits_cnn_teacher: TeacherFiles, start_worker: StartWorker
) -> None:
    """Each feature method trains a CNN student; hooks on a safetensors teacher, extra outputs of
    an ONNX one."""
    start_worker()
    hooked = upload_safetensors_teacher(client, digits_cnn_teacher)["id"]
    onnx = upload_teacher(client, digits_cnn_teacher)["id"]
    training = {"epochs": 3, "batch_size": 64, "learning_rate": 0.01}
    student = {"architecture": "cnn", "channels": [8]}
    jobs = {
        method: client.post(
            "/v1/jobs",
            json=job_body(
                teacher, student=student, training=training, distillation={"method": method}
            ),
        ).json()["id"]
        for method, teacher in (("fitnets", hooked), ("rkd", hooked), ("at", onnx), ("sp", onnx))
    }
    terms = {
        "fitnets": "fitnets_loss",
        "rkd": "rkd_distance_loss",
        "at": "at_loss",
        "sp": "sp_loss",
    }
    data = load_builtin("builtin:digits")
    for method, job_id in jobs.items():
        job = wait_for(client, job_id, is_terminal)
        assert job["status"] == "succeeded", (method, job["error"])
        assert job["result"]["student_accuracy"] > 0.8, method
        values = job["latest_metrics"]
        assert values[f"train_{terms[method]}"] > 0 and values["train_ce_loss"] > 0
        predicted = client.post(
            f"/v1/jobs/{job_id}/predict", json={"inputs": data.x_test[:50].tolist()}
        ).json()["predictions"]
        assert len(predicted) == 50


def test_running_job_is_cancelled(
    client: TestClient, digits_teacher: TeacherFiles, start_worker: StartWorker
) -> None:
    start_worker()
    teacher = upload_teacher(client, digits_teacher)
    body = job_body(
        teacher["id"],
        student={"architecture": "cnn", "channels": [4, 8]},  # the channels-last path
        training={"epochs": 1000, "batch_size": 8},
    )
    job_id = client.post("/v1/jobs", json=body).json()["id"]
    wait_for(client, job_id, lambda j: j["phase"] == "training" and j["latest_metrics"] is not None)
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] in ("cancelling", "cancelled")
    job = wait_for(client, job_id, is_terminal, timeout=30)
    assert job["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{job_id}/artifact").status_code == 409


def test_killed_worker_job_resumes_from_its_checkpoint(
    client: TestClient, digits_teacher: TeacherFiles, start_worker: StartWorker
) -> None:
    fast_recovery = {"DISTILL_JOB_STALE_AFTER_S": "4", "DISTILL_RECOVERY_INTERVAL_S": "1"}
    first = start_worker(**fast_recovery)
    teacher = upload_teacher(client, digits_teacher)
    body = job_body(teacher["id"], training={"epochs": 40, "batch_size": 16})
    job_id = client.post("/v1/jobs", json=body).json()["id"]
    wait_for(
        client, job_id, lambda j: (j["latest_metrics"] or {}).get("epoch", 0) >= 3, timeout=120
    )
    os.killpg(first.pid, signal.SIGKILL)  # the whole worker, as a lost machine would
    first.wait()
    killed_at = client.get(f"/v1/jobs/{job_id}").json()
    assert killed_at["status"] == "running"

    start_worker(beat=True, **fast_recovery)
    job = wait_for(client, job_id, is_terminal, timeout=180)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 2
    # It went on from the last epoch checkpointed before the kill, not from the start.
    resumed_from = job["result"]["resumed_from_epoch"]
    assert 3 <= resumed_from <= killed_at["latest_metrics"]["epoch"] + 1
    assert job["result"]["teacher_outputs_cached"] is True
    epochs = [m["epoch"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]]
    assert epochs == list(range(1, 41))


def job_process(worker_pid: int) -> int:
    """The process running the job: the worker's descendant started as `worker.job_process`."""
    pending = [worker_pid]
    while pending:
        pid = pending.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"worker.job_process" in command:
            return pid
        pending += [int(child) for child in children]
    raise AssertionError("no job process")


def test_a_killed_job_process_runs_again_within_30_s(
    client: TestClient, digits_teacher: TeacherFiles, start_worker: StartWorker
) -> None:
    """SIGKILL of the process running a job (out of memory, say), with the default settings:
    its supervisor requeues the job at once, and it resumes from its last checkpoint."""
    worker = start_worker(beat=True)
    teacher = upload_teacher(client, digits_teacher)
    body = job_body(teacher["id"], training={"epochs": 40, "batch_size": 16})
    job_id = client.post("/v1/jobs", json=body).json()["id"]
    wait_for(
        client, job_id, lambda j: (j["latest_metrics"] or {}).get("epoch", 0) >= 3, timeout=120
    )
    os.kill(job_process(worker.pid), signal.SIGKILL)
    killed = time.monotonic()
    epoch_at_kill = client.get(f"/v1/jobs/{job_id}").json()["latest_metrics"]["epoch"]
    wait_for(client, job_id, lambda j: j["attempt"] == 2 and j["status"] == "running", timeout=60)
    running_again = time.monotonic() - killed
    print(f"running again {running_again:.1f} s after the kill (epoch {epoch_at_kill})")
    assert running_again < 30
    job = wait_for(client, job_id, is_terminal, timeout=180)
    assert job["status"] == "succeeded", job["error"]
    assert 3 <= job["result"]["resumed_from_epoch"] <= epoch_at_kill + 1


def test_a_job_whose_broker_message_was_lost_runs(
    client: TestClient, stack: Stack, digits_teacher: TeacherFiles, start_worker: StartWorker
) -> None:
    """Submitted while no worker runs, its message then lost (a Redis restart without
    persistence): the recovery schedule sends it again and the job runs."""
    teacher = upload_teacher(client, digits_teacher)
    job_id = client.post("/v1/jobs", json=job_body(teacher["id"])).json()["id"]
    if stack.name == "server":
        redis.Redis.from_url(REDIS_URL).flushdb()
    else:
        for message in (stack.home / "broker").glob("*.msg"):
            message.unlink()
    start_worker(beat=True)
    job = wait_for(client, job_id, is_terminal, timeout=120)
    assert (job["status"], job["attempt"]) == ("succeeded", 1), job["error"]


def test_cancelled_jobs_do_not_hold_up_the_queue(
    client: TestClient, digits_teacher: TeacherFiles, start_worker: StartWorker
) -> None:
    """40 submissions, 39 of them cancelled while queued: their messages cost the worker a
    database update each, not a process, so the last job starts about as soon as the worker."""
    teacher = upload_teacher(client, digits_teacher)
    ids = [client.post("/v1/jobs", json=job_body(teacher["id"])).json()["id"] for _ in range(40)]
    for job_id in ids[:-1]:
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    started = time.monotonic()
    start_worker()
    wait_for(client, ids[-1], lambda j: j["status"] != "queued", timeout=60)
    waited = time.monotonic() - started
    print(f"the real job started {waited:.1f} s after the worker (39 cancelled messages before it)")
    assert waited < 20
    assert is_terminal(wait_for(client, ids[-1], is_terminal))


def test_workers_stopped_mid_job_and_started_again(
    client: TestClient, digits_teacher: TeacherFiles, start_worker: StartWorker
) -> None:
    """Every worker stopped (SIGTERM to its process group, as a redeploy does) mid-job, nothing
    running for 15 s, then a worker started: the job runs again within seconds, from its last
    checkpoint, with the default recovery settings."""
    first = start_worker(beat=True)
    teacher = upload_teacher(client, digits_teacher)
    body = job_body(teacher["id"], training={"epochs": 40, "batch_size": 16})
    job_id = client.post("/v1/jobs", json=body).json()["id"]
    wait_for(
        client, job_id, lambda j: (j["latest_metrics"] or {}).get("epoch", 0) >= 3, timeout=120
    )
    os.killpg(first.pid, signal.SIGTERM)
    first.wait(timeout=60)
    epoch_at_stop = client.get(f"/v1/jobs/{job_id}").json()["latest_metrics"]["epoch"]
    time.sleep(15)
    restarted = time.monotonic()
    start_worker(beat=True)
    wait_for(client, job_id, lambda j: j["attempt"] == 2 and j["status"] == "running", timeout=60)
    print(f"running again {time.monotonic() - restarted:.1f} s after the workers came back")
    job = wait_for(client, job_id, is_terminal, timeout=180)
    assert job["status"] == "succeeded", job["error"]
    assert 3 <= job["result"]["resumed_from_epoch"] <= epoch_at_stop + 1


def test_the_api_restarted_mid_job_loses_nothing(
    client: TestClient, digits_teacher: TeacherFiles, start_worker: StartWorker
) -> None:
    """The API holds no job state: an API process stopped mid-job and a new one started see the
    job run on to success, once."""
    from app.main import create_app

    start_worker(beat=True)
    teacher = upload_teacher(client, digits_teacher)
    body = job_body(teacher["id"], training={"epochs": 20, "batch_size": 16})
    with TestClient(create_app(), headers=client.headers) as first_api:
        job_id = first_api.post("/v1/jobs", json=body).json()["id"]
        wait_for(first_api, job_id, lambda j: (j["latest_metrics"] or {}).get("epoch", 0) >= 2)
    with TestClient(create_app(), headers=client.headers) as second_api:
        job = wait_for(second_api, job_id, is_terminal, timeout=180)
    assert (job["status"], job["attempt"]) == ("succeeded", 1), job["error"]
    epochs = [m["epoch"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]]
    assert epochs == list(range(1, 21))
