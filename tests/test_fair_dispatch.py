"""Fair dispatch end to end, on the server stack (where tenants have keys): a burst of 200 jobs
from one tenant, then one job from another, on a real Celery worker with one slot."""

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app import db
from app.auth import create_key
from app.config import get_settings
from app.models import Job, JobStatus, KeyRole
from tests.helpers.api import job_body, upload_teacher
from tests.helpers.stacks import Stack
from tests.helpers.teachers import TeacherFiles
from tests.helpers.workers import StartWorker, is_terminal

BURST = 200


@pytest.fixture
def roomy_queue(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A queued-jobs quota the burst fits in (the default is 100)."""
    monkeypatch.setenv("DISTILL_QUOTA_QUEUED_JOBS", str(2 * BURST))
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def test_a_burst_of_200_jobs_delays_another_tenants_job_by_at_most_one_slot(
    client: TestClient,
    stack: Stack,
    digits_teacher: TeacherFiles,
    start_worker: StartWorker,
    roomy_queue: None,
) -> None:
    if stack.name != "server":
        pytest.skip("tenants have keys in server mode")
    with db.session_scope() as session:
        _, other_key = create_key(session, "second-team", KeyRole.MEMBER, name="fairness")
    other = {"Authorization": f"Bearer {other_key}"}
    body = job_body(upload_teacher(client, digits_teacher)["id"], training={"epochs": 1})
    started = time.monotonic()
    burst = [client.post("/v1/jobs", json=body) for _ in range(BURST)]
    assert [r.status_code for r in burst] == [202] * BURST
    print(f"{BURST} submissions in {time.monotonic() - started:.1f} s")
    their_teacher = upload_teacher(client, digits_teacher, headers=other)["id"]
    single = client.post("/v1/jobs", json=job_body(their_teacher), headers=other).json()["id"]

    start_worker()
    job = None
    deadline = time.monotonic() + 120
    while job is None or not is_terminal(job):
        assert time.monotonic() < deadline, "the second tenant's job did not finish"
        time.sleep(0.3)
        job = client.get(f"/v1/jobs/{single}", headers=other).json()
    assert job["status"] == "succeeded", job["error"]
    with db.session_scope() as session:
        # The burst's jobs still queued are cancelled, so the worker stops taking them.
        session.execute(
            update(Job)
            .where(Job.status == JobStatus.QUEUED)
            .values(status=JobStatus.CANCELLED, cancel_requested=True)
        )
        single_started = session.scalar(select(Job.started_at).where(Job.id == single))
        ahead = session.scalars(
            select(Job.id).where(Job.id != single, Job.started_at < single_started)
        ).all()
    print(f"burst jobs started before the other tenant's: {len(ahead)}")
    assert len(ahead) <= 1  # the one running when it was submitted
