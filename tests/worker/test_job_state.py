"""Job ownership on the real databases: claims, fencing of a superseded attempt, recovery."""

import time
from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from app.db import session_scope
from app.models import ArtifactFormat, Job, JobPhase, JobStatus, utcnow
from app.storage import get_store, keys
from tests.helpers.api import job_body, upload_teacher
from tests.helpers.teachers import TeacherFiles
from worker.attempt import Attempt, JobSuperseded
from worker.pipeline import claim, finalize, finish
from worker.recipe import Cancelled
from worker.recovery import recover_stale_jobs


@pytest.fixture
def job_id(client: TestClient, digits_teacher: TeacherFiles) -> str:
    teacher = upload_teacher(client, digits_teacher)
    return str(client.post("/v1/jobs", json=job_body(teacher["id"])).json()["id"])


def set_job(job_id: str, **values: object) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        for key, value in values.items():
            setattr(job, key, value)


def get_job(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def test_claim_is_once(job_id: str) -> None:
    assert claim(job_id, max_attempts=3) == 1
    assert claim(job_id, max_attempts=3) is None  # a duplicate delivery
    assert get_job(job_id).status == JobStatus.RUNNING


def test_claim_respects_the_attempt_cap(job_id: str) -> None:
    set_job(job_id, attempt=3)
    assert claim(job_id, max_attempts=3) is None


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.02)


def raises_superseded(reporter: Attempt) -> bool:
    try:
        reporter.keep_alive()
    except JobSuperseded:
        return True
    return False


def test_a_superseded_attempt_stops_and_writes_nothing(job_id: str) -> None:
    attempt = claim(job_id, max_attempts=3)
    assert attempt == 1
    with Attempt(job_id, attempt, interval_s=0.05) as reporter:
        reporter.progress(0.5)
        eventually(lambda: get_job(job_id).progress == 0.5)  # written by the heartbeat thread
        # The job is requeued and claimed again by another worker.
        set_job(job_id, status=JobStatus.QUEUED)
        assert claim(job_id, max_attempts=3) == 2
        eventually(lambda: raises_superseded(reporter))
        with pytest.raises(JobSuperseded):
            reporter.should_stop()
        with pytest.raises(JobSuperseded):
            reporter.epoch_end(1, {"loss": 1.0})
    assert not finish(job_id, attempt, JobStatus.FAILED, error={"code": "x", "detail": "x"})
    job = get_job(job_id)
    assert (job.status, job.attempt) == (JobStatus.RUNNING, 2)


def test_the_heartbeat_goes_on_while_the_job_is_busy(job_id: str) -> None:
    """A teacher batch or a latency measurement that holds the job's thread for a long time
    still beats: a stale heartbeat means the process is gone, never that it is slow."""
    attempt = claim(job_id, max_attempts=3)
    assert attempt == 1
    with Attempt(job_id, attempt, interval_s=0.05):
        before = get_job(job_id).heartbeat_at
        time.sleep(0.5)  # the job's thread is busy and calls nothing
        after = get_job(job_id).heartbeat_at
    assert before is not None and after is not None and after - before >= timedelta(seconds=0.3)


def test_a_cancel_is_seen_between_teacher_batches(client: TestClient, job_id: str) -> None:
    attempt = claim(job_id, max_attempts=3)
    assert attempt is not None
    with Attempt(job_id, attempt, interval_s=0.05) as reporter:
        reporter.keep_alive()
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelling"

        def cancelled() -> bool:
            try:
                reporter.keep_alive()
            except Cancelled:
                return True
            return False

        eventually(cancelled)


def test_success_keeps_only_the_winning_attempts_files(job_id: str) -> None:
    assert claim(job_id, max_attempts=3) == 1
    set_job(job_id, status=JobStatus.QUEUED)  # requeued after exporting, say
    assert claim(job_id, max_attempts=3) == 2
    store = get_store()
    paths = {}
    for attempt in (1, 2):
        path = store.path(f"{keys.artifact(job_id, attempt)}/model.onnx")
        path.parent.mkdir(parents=True)
        path.write_bytes(b"onnx")
        paths[attempt] = path
    with pytest.raises(JobSuperseded):
        finalize(job_id, 1, {}, {})
    assert paths[1].exists()  # a superseded attempt deletes nothing
    finalize(job_id, 2, {ArtifactFormat.ONNX: paths[2]}, {"student_accuracy": 0.9})
    assert paths[2].exists() and not paths[1].parent.exists()
    assert get_job(job_id).status == JobStatus.SUCCEEDED


def test_cancel_is_seen_at_the_next_phase(client: TestClient, job_id: str) -> None:
    attempt = claim(job_id, max_attempts=3)
    assert attempt is not None
    reporter = Attempt(job_id, attempt, interval_s=0.0)
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    with pytest.raises(Cancelled):
        reporter.phase(JobPhase.TRAINING)
    assert reporter.should_stop()


def test_recovery_requeues_only_silent_jobs(
    client: TestClient, digits_teacher: TeacherFiles
) -> None:
    teacher = upload_teacher(client, digits_teacher)
    ids = [client.post("/v1/jobs", json=job_body(teacher["id"])).json()["id"] for _ in range(4)]
    silent, alive, cancelling, exhausted = ids
    long_ago = utcnow() - timedelta(hours=1)
    for job_id in ids:
        claim(job_id, max_attempts=3)
    set_job(silent, heartbeat_at=long_ago)
    set_job(cancelling, heartbeat_at=long_ago, status=JobStatus.CANCELLING)
    set_job(exhausted, heartbeat_at=long_ago, attempt=3)

    assert recover_stale_jobs() == [silent]
    assert get_job(silent).status == JobStatus.QUEUED
    assert get_job(alive).status == JobStatus.RUNNING
    assert get_job(cancelling).status == JobStatus.CANCELLED
    failed = get_job(exhausted)
    assert failed.status == JobStatus.FAILED and failed.error is not None
    assert failed.error["code"] == "worker_lost"
    assert claim(silent, max_attempts=3) == 2  # the requeued job can be claimed again


def test_the_watchdog_calls_on_stall_when_the_job_shows_no_progress(job_id: str) -> None:
    attempt = claim(job_id, max_attempts=3)
    assert attempt == 1
    stalls: list[float] = []
    with Attempt(
        job_id,
        attempt,
        interval_s=0.05,
        stall_timeout_s=0.3,
        on_stall=lambda: stalls.append(time.monotonic()),
    ) as reporter:
        for _ in range(10):  # progress every 0.1 s: never stalled
            reporter.progress(0.1)
            last_progress = time.monotonic()
            time.sleep(0.1)
        assert stalls == []
        eventually(lambda: bool(stalls))  # then nothing for 0.3 s
    assert 0.3 <= stalls[0] - last_progress < 1.0
