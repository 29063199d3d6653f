"""Retention (issue 13, part 4), on both stacks: deleting finished jobs (their metrics and files),
uploaded datasets no unfinished job uses, and a tenant's caches; students removed past
``DISTILL_ARTIFACT_RETENTION_DAYS``; the bytes a tenant stores, by ``GET /v1/usage`` and in
``/metrics``."""

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.config import get_settings
from app.datasets.loading import load_builtin
from app.db import session_scope
from app.models import Job, utcnow
from app.storage import get_store, keys
from tests.helpers.api import job_body, npz_bytes, upload_teacher
from tests.helpers.stacks import Stack
from tests.helpers.teachers import TeacherFiles
from worker import retention
from worker.pipeline import run_job
from worker.retention import expire_artifacts


def upload_digits(client: TestClient) -> dict[str, object]:
    digits = load_builtin("builtin:digits")
    assert digits.x_test is not None and digits.y_test is not None
    response = client.post(
        "/v1/datasets", files={"file": ("d.npz", npz_bytes(x=digits.x_test, y=digits.y_test))}
    )
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    return body


def files_under(prefix: str) -> list[Path]:
    return [p for p in get_store().path(prefix).rglob("*") if p.is_file()]


def test_a_finished_job_is_deleted_with_its_metrics_and_files(
    client: TestClient, digits_teacher: TeacherFiles
) -> None:
    teacher = upload_teacher(client, digits_teacher)["id"]
    job, queued = (client.post("/v1/jobs", json=job_body(teacher)).json()["id"] for _ in range(2))
    run_job(job)
    assert client.put(f"/v1/jobs/{job}/alias", json={"alias": "kept"}).status_code == 200
    assert client.get(f"/v1/jobs/{job}/metrics").json()["items"]
    assert files_under(keys.artifacts(job))
    before = client.get("/v1/usage").json()
    assert before["artifacts_bytes"] == sum(
        p.stat().st_size for p in files_under(keys.artifacts(job))
    )

    refused = client.delete(f"/v1/jobs/{queued}")
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "job_not_finished" and refused.json()["job_status"] == "queued"
    assert client.get(f"/v1/jobs/{queued}").json()["status"] == "queued"  # untouched

    assert client.delete(f"/v1/jobs/{job}").status_code == 204
    for path in (f"/v1/jobs/{job}", f"/v1/jobs/{job}/metrics", f"/v1/jobs/{job}/artifact"):
        assert client.get(path).status_code == 404, path
    assert (
        client.post(f"/v1/jobs/{job}/predict", json={"inputs": [[[[0.0] * 8] * 8]]}).status_code
        == 404
    )
    assert client.get("/v2/models/kept").status_code == 404
    assert not files_under(keys.artifacts(job)) and not files_under(keys.checkpoints(job))
    assert client.get("/v1/usage").json()["artifacts_bytes"] == 0
    assert client.delete(f"/v1/jobs/{job}").status_code == 404

    assert client.post(f"/v1/jobs/{queued}/cancel").status_code == 202
    assert client.delete(f"/v1/jobs/{queued}").status_code == 204
    assert client.get("/v1/jobs").json()["total"] == 0


def test_a_dataset_is_deleted_once_no_unfinished_job_uses_it(
    client: TestClient, digits_teacher: TeacherFiles
) -> None:
    teacher = upload_teacher(client, digits_teacher)["id"]
    dataset = upload_digits(client)
    ref = str(dataset["ref"])
    assert files_under(keys.dataset_dir(ref))
    used = client.post("/v1/jobs", json=job_body(teacher, dataset=ref)).json()["id"]

    refused = client.delete(f"/v1/datasets/{ref}")
    assert refused.status_code == 409 and refused.json()["code"] == "dataset_in_use", refused.text
    assert client.get(f"/v1/datasets/{ref}").status_code == 200 and files_under(
        keys.dataset_dir(ref)
    )

    builtin = client.delete("/v1/datasets/builtin:digits")
    assert builtin.status_code == 409 and builtin.json()["code"] == "builtin_dataset"

    assert client.post(f"/v1/jobs/{used}/cancel").status_code == 202
    assert client.delete(f"/v1/datasets/{ref}").status_code == 204
    assert client.get(f"/v1/datasets/{ref}").status_code == 404
    assert not files_under(keys.dataset_dir(ref))
    assert client.get(f"/v1/jobs/{used}").json()["dataset"] == ref  # the job keeps its record
    # A job can no longer name it.
    again = client.post("/v1/jobs", json=job_body(teacher, dataset=ref))
    assert again.status_code == 422 and again.json()["field"] == "dataset"


def test_usage_counts_what_the_tenant_stores_and_the_cache_empties(
    stack: Stack, client: TestClient, digits_teacher: TeacherFiles
) -> None:
    assert client.delete("/v1/cache").status_code == 204  # earlier tests' entries
    assert client.get("/v1/usage").json() == {
        "teachers_bytes": 0,
        "datasets_bytes": 0,
        "artifacts_bytes": 0,
        "cache_bytes": 0,
        "total_bytes": 0,
    }
    teacher = upload_teacher(client, digits_teacher)
    dataset = upload_digits(client)
    job = client.post("/v1/jobs", json=job_body(teacher["id"])).json()["id"]
    run_job(job)
    usage = client.get("/v1/usage").json()
    assert usage["teachers_bytes"] == teacher["size_bytes"] == digits_teacher.onnx.stat().st_size
    assert usage["datasets_bytes"] == dataset["size_bytes"]
    cache = files_under(keys.teacher_cache(stack.tenant_id))
    assert cache and usage["cache_bytes"] == sum(p.stat().st_size for p in cache)
    assert usage["total_bytes"] == sum(v for k, v in usage.items() if k != "total_bytes")

    scrape = client.get("/metrics").text
    tenant = "default" if stack.api_key is None else "tests"
    for kind in ("teachers", "datasets", "artifacts"):
        size = float(usage[f"{kind}_bytes"])
        line = f'distill_storage_bytes{{kind="{kind}",tenant="{tenant}"}} {size}'
        assert line in scrape, (line, [x for x in scrape.splitlines() if "storage" in x])

    assert client.delete("/v1/cache").status_code == 204
    assert not files_under(keys.teacher_cache(stack.tenant_id))
    assert client.get("/v1/usage").json()["cache_bytes"] == 0
    # A job after it computes its teacher outputs again, and succeeds.
    again = client.post("/v1/jobs", json=job_body(teacher["id"])).json()["id"]
    run_job(again)
    assert client.get(f"/v1/jobs/{again}").json()["status"] == "succeeded"
    assert np.isclose(
        client.get(f"/v1/jobs/{again}").json()["result"]["teacher_accuracy"],
        client.get(f"/v1/jobs/{job}").json()["result"]["teacher_accuracy"],
    )


def test_students_past_the_retention_period_are_removed_and_their_jobs_kept(
    client: TestClient, digits_teacher: TeacherFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = upload_teacher(client, digits_teacher)["id"]
    old, older, recent = (
        client.post("/v1/jobs", json=job_body(teacher)).json()["id"] for _ in range(3)
    )
    for job_id in (old, older, recent):
        run_job(job_id)
    assert client.put(f"/v1/jobs/{old}/alias", json={"alias": "aged"}).status_code == 200
    with session_scope() as session:  # they finished 8 days ago
        session.execute(
            update(Job)
            .where(Job.id.in_([old, older]))
            .values(finished_at=utcnow() - timedelta(days=8))
        )
    assert expire_artifacts() == []  # no retention set: kept
    monkeypatch.setenv("DISTILL_ARTIFACT_RETENTION_DAYS", "7")
    monkeypatch.setattr(retention, "BATCH", 1)  # one run goes through every batch
    get_settings.cache_clear()
    try:
        assert sorted(expire_artifacts()) == sorted([old, older])
        assert expire_artifacts() == []
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()

    assert not files_under(keys.artifacts(old)) and not files_under(keys.artifacts(older))
    assert files_under(keys.artifacts(recent))
    job = client.get(f"/v1/jobs/{old}").json()
    assert job["status"] == "succeeded" and job["artifacts_removed_at"] is not None
    assert job["result"]["student_accuracy"] > 0 and client.get(f"/v1/jobs/{old}/metrics").json()
    for response in (
        client.get(f"/v1/jobs/{old}/artifact"),
        client.post(f"/v1/jobs/{old}/predict", json={"inputs": [[[[0.0] * 8] * 8]]}),
    ):
        assert response.status_code == 410, response.text
        assert response.json()["code"] == "artifacts_expired"
    v2 = client.get("/v2/models/aged")  # the protocol answers every unservable model 404
    assert v2.status_code == 404 and "retention period" in v2.json()["error"]
    assert client.get(f"/v1/jobs/{recent}/artifact").status_code == 200
    usage = client.get("/v1/usage").json()["artifacts_bytes"]
    assert usage == sum(p.stat().st_size for p in files_under(keys.artifacts(recent)))
