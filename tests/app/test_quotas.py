"""Per-tenant quotas (issue 13, part 2), on both stacks: queued jobs (429 with Retry-After),
stored bytes (507, or 413 for more than the whole quota; nothing kept), predict requests per
second on `/predict` and `/v2` (429 with Retry-After; RateLimit fields on every answer)."""

import re
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from app.client import DistillError
from app.config import get_settings
from tests.helpers.api import job_body, upload_teacher
from tests.helpers.teachers import TeacherFiles
from worker.pipeline import run_job

SetQuota = Callable[[str, int], None]


@pytest.fixture
def set_quota(monkeypatch: pytest.MonkeyPatch) -> Iterator[SetQuota]:
    def set_(name: str, value: int) -> None:
        monkeypatch.setenv(f"DISTILL_QUOTA_{name.upper()}", str(value))
        get_settings.cache_clear()

    yield set_
    monkeypatch.undo()
    get_settings.cache_clear()


def assert_problem(response: Response, status: int, code: str, quota: str, limit: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert (body["code"], body["quota"], body["limit"]) == (code, quota, limit), body


def test_queued_jobs_beyond_the_quota_are_429_until_one_leaves_the_queue(
    client: TestClient, digits_teacher: TeacherFiles, set_quota: SetQuota
) -> None:
    set_quota("queued_jobs", 2)
    body = job_body(upload_teacher(client, digits_teacher)["id"])
    first, _ = (client.post("/v1/jobs", json=body) for _ in range(2))
    refused = client.post("/v1/jobs", json=body)
    assert_problem(refused, 429, "queued_jobs_quota", "queued_jobs", 2)
    assert int(refused.headers["Retry-After"]) > 0
    assert DistillError.from_response(refused).retry_after_s == int(refused.headers["Retry-After"])
    assert client.get("/v1/jobs").json()["total"] == 2  # nothing was queued
    client.post(f"/v1/jobs/{first.json()['id']}/cancel")
    assert client.post("/v1/jobs", json=body).status_code == 202


def test_uploads_beyond_the_storage_quota_are_refused_and_nothing_is_kept(
    client: TestClient, digits_teacher: TeacherFiles, set_quota: SetQuota
) -> None:
    assert client.delete("/v1/cache").status_code == 204  # earlier tests' entries count too
    size = digits_teacher.onnx.stat().st_size
    set_quota("storage_bytes", size - 1)
    with open(digits_teacher.onnx, "rb") as f:
        too_big = client.post("/v1/teachers", files={"file": ("t.onnx", f)})
    assert_problem(too_big, 413, "storage_quota", "storage_bytes", size - 1)

    set_quota("storage_bytes", size + size // 2)
    teacher = upload_teacher(client, digits_teacher)["id"]
    with open(digits_teacher.onnx, "rb") as f:
        full = client.post("/v1/teachers", files={"file": ("t.onnx", f)})
    assert_problem(full, 507, "storage_quota", "storage_bytes", size + size // 2)
    assert full.json()["used_bytes"] == size
    assert [t["id"] for t in client.get("/v1/teachers").json()["items"]] == [teacher]
    assert client.get("/v1/usage").json()["total_bytes"] == size  # the refused file is gone

    set_quota("storage_bytes", size)  # full to the byte: no job, whose student needs room
    refused_job = client.post("/v1/jobs", json=job_body(teacher))
    assert_problem(refused_job, 507, "storage_quota", "storage_bytes", size)
    assert client.get("/v1/jobs").json()["total"] == 0

    assert client.delete(f"/v1/teachers/{teacher}").status_code == 204
    upload_teacher(client, digits_teacher)  # room again


RATE = re.compile(r'^"predict";r=(\d+);t=(\d+)$')


def remaining(response: Response) -> int:
    assert response.headers["RateLimit-Policy"] == '"predict";q=3;w=1'
    match = RATE.match(response.headers["RateLimit"])
    assert match is not None, response.headers["RateLimit"]
    return int(match.group(1))


def test_predict_requests_beyond_the_rate_are_429_on_both_protocols(
    client: TestClient, digits_teacher: TeacherFiles, set_quota: SetQuota
) -> None:
    job = client.post("/v1/jobs", json=job_body(upload_teacher(client, digits_teacher)["id"]))
    job_id = job.json()["id"]
    run_job(job_id)
    sample = [[[[0.0] * 8] * 8]]
    infer = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                         "data": [0.0] * 64}]}  # fmt: skip
    name = client.get(f"/v2/models/{job_id}").json()["inputs"][0]["name"]
    infer["inputs"][0]["name"] = name
    assert client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": sample}).status_code == 200

    set_quota("predict_rps", 3)
    time.sleep(2.1)  # a fresh window
    answers = [
        client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": sample}),
        client.post(f"/v2/models/{job_id}/infer", json=infer),
        client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": sample}),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert [remaining(a) for a in answers] == [2, 1, 0]

    refused = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": sample})
    assert_problem(refused, 429, "predict_rate_quota", "predict_rps", 3)
    assert 1 <= int(refused.headers["Retry-After"]) <= 2
    assert remaining(refused) == 0
    refused_v2 = client.post(f"/v2/models/{job_id}/infer", json=infer)
    assert refused_v2.status_code == 429
    assert "error" in refused_v2.json() and "Retry-After" in refused_v2.headers

    time.sleep(2.1)  # the sliding window has moved past them
    assert client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": sample}).status_code == 200


def test_predicts_go_on_uncounted_when_the_counter_is_unreachable(
    client: TestClient, digits_teacher: TeacherFiles, set_quota: SetQuota,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """With the rate's Redis down, serving is not: requests are let through, without the
    RateLimit fields (and the failure is logged)."""
    job_id = client.post(
        "/v1/jobs", json=job_body(upload_teacher(client, digits_teacher)["id"])
    ).json()["id"]
    run_job(job_id)
    monkeypatch.setenv("DISTILL_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    set_quota("predict_rps", 1)
    sample = {"inputs": [[[[0.0] * 8] * 8]]}
    answers = [client.post(f"/v1/jobs/{job_id}/predict", json=sample) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all("RateLimit" not in a.headers for a in answers)
