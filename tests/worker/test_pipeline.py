"""A job through ``worker.pipeline.run_job`` on the real databases, in this process, without
Celery: claim, read (teachers from their membership rows), recipe, finalize."""

from datetime import datetime

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.datasets.loading import load_builtin
from app.db import session_scope
from app.models import Teacher
from tests.helpers.api import job_body, upload_teacher
from tests.helpers.teachers import TeacherFiles
from worker.pipeline import run_job


def test_a_job_runs_in_process_and_its_student_is_served(
    client: TestClient, digits_teacher: TeacherFiles
) -> None:
    teacher = upload_teacher(client, digits_teacher)
    job_id = client.post("/v1/jobs", json=job_body(teacher["id"])).json()["id"]
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["phase"], job["attempt"]) == ("succeeded", "done", 1), job["error"]
    result = job["result"]
    assert result["teacher_accuracy"] == pytest.approx(digits_teacher.test_accuracy)
    assert result["epochs_run"] == 3 and result["wall_seconds"] > 0
    phases = job["phase_seconds"]
    assert list(phases) == ["validating", "teacher_outputs", "training", "evaluating", "exporting"]
    assert all(seconds >= 0 for seconds in phases.values()) and phases["training"] > 0
    ran = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
    assert sum(phases.values()) <= ran.total_seconds()
    codes = [w["code"] for w in result["warnings"]]
    assert codes == (["still_improving"] if result["best_epoch"] == 3 else [])
    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    manifest = client.get(f"/v1/jobs/{job_id}/artifact", params={"format": "manifest"}).json()
    assert manifest["metrics"] == result  # the artifact carries the figures the job reports
    data = load_builtin("builtin:digits")
    predicted = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": data.x_test.tolist()})
    accuracy = (np.array(predicted.json()["predictions"]) == data.y_test).mean()
    assert accuracy == pytest.approx(result["student_accuracy"])

    too_many = client.post(
        f"/v1/jobs/{job_id}/predict", json={"inputs": [data.x_test[0].tolist()] * 1025}
    )
    assert (too_many.status_code, too_many.json()["field"]) == (422, "inputs")
    assert "At most 1024 samples" in too_many.json()["detail"]

    run_job(job_id)  # a duplicate delivery changes nothing
    assert client.get(f"/v1/jobs/{job_id}").json()["attempt"] == 1


def test_a_teacher_gone_before_the_job_runs_fails_it_by_name(
    client: TestClient, digits_teacher: TeacherFiles
) -> None:
    first = upload_teacher(client, digits_teacher)["id"]
    second = upload_teacher(client, digits_teacher)["id"]
    body = job_body(None, teachers=[{"id": first}, {"id": second}])
    del body["teacher"]
    job_id = client.post("/v1/jobs", json=body).json()["id"]
    with session_scope() as session:  # behind the API's back, which refuses it (409)
        session.delete(session.get(Teacher, second))
    run_job(job_id)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "teacher_missing" and second in job["error"]["detail"]
