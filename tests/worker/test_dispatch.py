"""Fair dispatch on the real databases: which queued job a free worker claims next
(``repository.claim_next``), the running-jobs quota, and the broker kept holding a message per
job that could run (``recovery.top_up_messages``)."""

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.config import Settings, get_settings
from app.db import session_scope
from app.jobs import repository
from app.models import Job, JobStatus, Tenant
from app.queue import QUEUE, get_celery, queue_depth
from tests.helpers.api import job_body, upload_teacher
from tests.helpers.teachers import TeacherFiles
from worker.pipeline import claim_next
from worker.recovery import top_up_messages


@pytest.fixture
def teacher_id(client: TestClient, digits_teacher: TeacherFiles) -> str:
    return str(upload_teacher(client, digits_teacher)["id"])


def new_tenant() -> str:
    with session_scope() as session:
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:12]}")
        session.add(tenant)
        session.flush()
        return tenant.id


def queue_jobs(tenant_id: str, teacher_id: str, count: int) -> list[str]:
    with session_scope() as session:
        jobs = [
            repository.add_job(
                session,
                tenant_id=tenant_id,
                spec=job_body(teacher_id),
                dataset_ref="builtin:digits",
                teacher_ids=[teacher_id],
            )
            for _ in range(count)
        ]
        return [job.id for job in jobs]


def tenant_of(job_id: str) -> str:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.tenant_id


def end(job_id: str) -> None:
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.SUCCEEDED))


def next_job(settings: Settings) -> str | None:
    claimed = claim_next(settings)
    return None if claimed is None else claimed[0]


@pytest.fixture
def settings() -> Iterator[Settings]:
    yield get_settings().model_copy(update={"quota_running_jobs": None})


def test_a_burst_of_200_delays_another_tenants_job_by_at_most_one_slot(
    teacher_id: str, settings: Settings
) -> None:
    """Two worker slots, tenant A's 200 jobs queued first: B's one job, submitted after, is
    claimed at the first free slot; B's next one, with both tenants idle, after one of A's."""
    burst, single = new_tenant(), new_tenant()
    queue_jobs(burst, teacher_id, 200)
    first, second = next_job(settings), next_job(settings)
    assert first is not None and second is not None
    assert {tenant_of(first), tenant_of(second)} == {burst}
    (late,) = queue_jobs(single, teacher_id, 1)
    end(first)  # a slot frees: A now runs 1 job, B none
    assert next_job(settings) == late

    (later,) = queue_jobs(single, teacher_id, 1)
    end(second)
    end(late)  # both tenants idle; B was served last, so A's turn, then B's
    assert tenant_of(str(next_job(settings))) == burst
    assert next_job(settings) == later


def test_tenants_with_as_many_running_jobs_take_turns(teacher_id: str, settings: Settings) -> None:
    """One slot, three tenants with 4 queued jobs each, in tenant order: each tenant's jobs
    run in its own order and the tenants alternate."""
    tenants = [new_tenant() for _ in range(3)]
    queued = {tenant: queue_jobs(tenant, teacher_id, 4) for tenant in tenants}
    order = []
    while (job_id := next_job(settings)) is not None:
        order.append(job_id)
        end(job_id)
    owners = [tenant_of(job_id) for job_id in order]
    assert owners == tenants * 4
    for tenant in tenants:
        assert [j for j in order if tenant_of(j) == tenant] == queued[tenant]


def test_the_running_jobs_quota_leaves_a_tenants_jobs_queued(
    teacher_id: str, settings: Settings
) -> None:
    limited = settings.model_copy(update={"quota_running_jobs": 2})
    busy, other = new_tenant(), new_tenant()
    queue_jobs(busy, teacher_id, 5)
    running = [next_job(limited), next_job(limited)]
    assert next_job(limited) is None  # the tenant runs its 2; the rest wait
    with session_scope() as session:
        assert repository.claimable_count(session, 3, 2) == 0
        assert repository.claimable_count(session, 3, None) == 3
    (waiting,) = queue_jobs(other, teacher_id, 1)
    assert next_job(limited) == waiting
    end(str(running[0]))
    claimed = next_job(limited)
    assert claimed is not None and tenant_of(claimed) == busy


def purge() -> None:
    with get_celery().connection_for_write() as connection:
        connection.default_channel.queue_purge(QUEUE)


def test_lost_messages_are_made_up_once(client: TestClient, teacher_id: str) -> None:
    """Each submission sends one message; with them lost, the recovery task sends one per job
    that could run, and not again while they wait in the broker."""
    purge()
    ids = [client.post("/v1/jobs", json=job_body(teacher_id)).json()["id"] for _ in range(3)]
    assert queue_depth() == 3
    purge()
    assert queue_depth() == 0
    assert next_job(get_settings()) == ids[0]  # the oldest; one left running, two queued
    assert top_up_messages() == 2
    assert queue_depth() == 2
    assert top_up_messages() == 0
    purge()


def test_racing_workers_never_pass_the_running_jobs_quota(
    teacher_id: str, settings: Settings
) -> None:
    """Six workers claiming at once, one tenant with a quota of 2 running jobs: two claims."""
    limited = settings.model_copy(update={"quota_running_jobs": 2})
    tenant = new_tenant()
    queue_jobs(tenant, teacher_id, 6)
    start = threading.Barrier(6)

    def claim() -> str | None:
        start.wait()
        return next_job(limited)

    with ThreadPoolExecutor(6) as pool:
        claimed = [job for job in pool.map(lambda _: claim(), range(6)) if job is not None]
    assert len(claimed) == len(set(claimed)) == 2
