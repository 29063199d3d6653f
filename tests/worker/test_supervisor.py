"""The supervisor on the real databases, watching real processes (``sleep`` stands for a job
process that will not stop): a cancel it ends after the grace period, the time limit, a job
process that died requeued at once, and a process whose job another attempt owns."""

import subprocess
import time

import pytest
from fastapi.testclient import TestClient

from app.config import get_settings
from app.db import session_scope
from app.models import Job, JobStatus
from tests.helpers.api import job_body, upload_teacher
from tests.helpers.teachers import TeacherFiles
from worker.pipeline import claim
from worker.supervisor import requeue_dead, supervise


@pytest.fixture
def job_id(client: TestClient, digits_teacher: TeacherFiles) -> str:
    teacher = upload_teacher(client, digits_teacher)
    return str(client.post("/v1/jobs", json=job_body(teacher["id"])).json()["id"])


def stuck_process() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


def job(job_id: str) -> Job:
    with session_scope() as session:
        row = session.get(Job, job_id)
        assert row is not None
        session.expunge(row)
        return row


def test_a_cancel_the_job_does_not_honour_ends_its_process(
    client: TestClient, job_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = get_settings()
    monkeypatch.setattr(settings, "cancel_grace_s", 1.0)
    monkeypatch.setattr(settings, "heartbeat_interval_s", 0.2)
    attempt = claim(job_id, settings.job_max_attempts)
    assert attempt == 1
    process = stuck_process()
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    started = time.monotonic()
    supervise(job_id, attempt, process, settings)
    assert process.returncode == -9 and time.monotonic() - started < 5
    ended = job(job_id)
    assert ended.status == JobStatus.CANCELLED and ended.error is not None
    assert "did not stop within 1 s" in ended.error["detail"]


def test_the_time_limit_ends_the_job_process(job_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    monkeypatch.setattr(settings, "job_time_limit_s", 1)
    monkeypatch.setattr(settings, "heartbeat_interval_s", 0.2)
    attempt = claim(job_id, settings.job_max_attempts)
    assert attempt == 1
    process = stuck_process()
    supervise(job_id, attempt, process, settings)
    assert process.returncode == -9
    ended = job(job_id)
    assert (ended.status, (ended.error or {}).get("code")) == (JobStatus.FAILED, "time_limit")


def test_a_dead_job_process_is_requeued_at_once_then_failed_past_the_cap(job_id: str) -> None:
    settings = get_settings()
    for attempt in range(1, settings.job_max_attempts + 1):
        assert claim(job_id, settings.job_max_attempts) == attempt
        requeue_dead(job_id, attempt, -9, settings)  # killed: out of memory, say
    ended = job(job_id)
    assert (ended.status, (ended.error or {}).get("code")) == (
        JobStatus.FAILED,
        "job_process_died",
    )
    assert "signal 9" in (ended.error or {})["detail"]


def test_a_superseded_job_process_is_ended(job_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    monkeypatch.setattr(settings, "heartbeat_interval_s", 0.2)
    assert claim(job_id, settings.job_max_attempts) == 1
    with session_scope() as session:  # recovery requeued it and another worker claimed it
        row = session.get(Job, job_id)
        assert row is not None
        row.status = JobStatus.QUEUED
    assert claim(job_id, settings.job_max_attempts) == 2
    process = stuck_process()
    supervise(job_id, 1, process, settings)
    assert process.returncode == -9
    assert (job(job_id).status, job(job_id).attempt) == (JobStatus.RUNNING, 2)
