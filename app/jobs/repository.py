"""Every write to job rows, their teachers, metrics and artifacts, in one place.

Each function takes the caller's session and never commits: the API's request dependency or the
worker's short ``session_scope`` owns the transaction. Writes made by a worker's attempt carry
``owned(job_id, attempt)``, so an attempt that was superseded (requeued after a missed heartbeat,
or finished) can no longer change the job; an attempt's metric writes go in the transaction of
such a fenced heartbeat (``worker.attempt``).
"""

from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.orm import Session

from app.models import (
    Artifact,
    ArtifactFormat,
    Job,
    JobMetric,
    JobPhase,
    JobStatus,
    JobTeacher,
    Teacher,
    Tenant,
    utcnow,
)

ACTIVE = (JobStatus.RUNNING, JobStatus.CANCELLING)


def owned(job_id: str, attempt: int) -> ColumnElement[bool]:
    """The condition every write of an attempt carries: it still owns the job."""
    return (Job.id == job_id) & (Job.attempt == attempt) & Job.status.in_(ACTIVE)


def add_job(
    session: Session,
    *,
    tenant_id: str,
    spec: dict[str, Any],
    dataset_ref: str,
    teacher_ids: list[str],
) -> Job:
    """A queued job of the tenant's and its teachers, in order."""
    job = Job(tenant_id=tenant_id, spec=spec, teacher_id=teacher_ids[0], dataset_ref=dataset_ref)
    session.add(job)
    session.flush()
    session.add_all(
        JobTeacher(job_id=job.id, position=i, teacher_id=teacher_id)
        for i, teacher_id in enumerate(teacher_ids)
    )
    return job


def transition(
    session: Session,
    job_id: str,
    from_statuses: Iterable[JobStatus],
    *conditions: ColumnElement[bool],
    **values: Any,
) -> bool:
    """Compare-and-set on the job's status (and any further conditions): True if this caller
    made the change."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(list(from_statuses)), *conditions)
        .values(**values)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def requeue_or_end(
    session: Session,
    job_id: str,
    attempt: int,
    max_attempts: int,
    guard: ColumnElement[bool],
    error: dict[str, Any],
) -> bool:
    """An attempt that ended without writing its end (its process or worker died): a cancel it
    was asked for is done; past ``max_attempts`` the job fails with ``error``; else it is queued
    again, to resume from its checkpoint. Each change is a compare-and-set on the attempt and
    ``guard``, so two recoverers never both act. True if it was queued again: the caller sends
    it (``enqueue_after_commit``)."""
    fenced = (Job.attempt == attempt, guard)
    ended = {"phase": JobPhase.DONE, "finished_at": utcnow()}
    if transition(
        session, job_id, [JobStatus.CANCELLING], *fenced, status=JobStatus.CANCELLED, **ended
    ):
        return False
    if attempt >= max_attempts:
        transition(
            session,
            job_id,
            [JobStatus.RUNNING],
            *fenced,
            status=JobStatus.FAILED,
            error=error,
            **ended,
        )
        return False
    return transition(
        session,
        job_id,
        [JobStatus.RUNNING],
        *fenced,
        status=JobStatus.QUEUED,
        phase=JobPhase.QUEUED,
        progress=0.0,
        enqueued_at=utcnow(),
    )


def request_cancel(session: Session, job_id: str) -> bool:
    """A queued job is cancelled at once; a running one is asked to stop at its next check.
    False when the job has already finished."""
    return transition(
        session,
        job_id,
        [JobStatus.QUEUED],
        status=JobStatus.CANCELLED,
        phase=JobPhase.DONE,
        cancel_requested=True,
        finished_at=utcnow(),
    ) or transition(
        session,
        job_id,
        [JobStatus.RUNNING, JobStatus.CANCELLING],
        status=JobStatus.CANCELLING,
        cancel_requested=True,
    )


def fail_unqueued(session: Session, job_ids: list[str]) -> None:
    """Jobs whose message could not be sent: failed, rather than queued forever."""
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.FAILED,
            phase=JobPhase.DONE,
            finished_at=utcnow(),
            error={"code": "broker_unavailable", "detail": "The job could not be queued."},
        )
    )


def claim(session: Session, job_id: str, max_attempts: int) -> int | None:
    """queued -> running in one compare-and-set; returns the attempt number, or None when there
    is nothing to claim (a duplicate delivery, a cancelled job, attempts used up)."""
    return session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.attempt < max_attempts)
        .values(
            status=JobStatus.RUNNING,
            phase=JobPhase.VALIDATING,
            attempt=Job.attempt + 1,
            progress=0.0,
            started_at=utcnow(),
            heartbeat_at=utcnow(),
            error=None,
            phase_seconds=None,
        )
        .returning(Job.attempt)
    ).scalar_one_or_none()


def running_by_tenant(session: Session) -> dict[str, int]:
    """Running (and cancelling) jobs per tenant that has any."""
    rows = session.execute(
        select(Job.tenant_id, func.count()).where(Job.status.in_(ACTIVE)).group_by(Job.tenant_id)
    )
    return {tenant_id: int(n) for tenant_id, n in rows}


def claim_next(
    session: Session, max_attempts: int, running_limit: int | None
) -> tuple[str, int | None] | None:
    """Claim the job a free worker should run next: ``(job id, attempt)``; None when no queued
    job may run now (none queued, or their tenants at ``running_limit``); ``(job id, None)``
    when another worker claimed the chosen job, or its tenant's last slot, first: the caller
    tries again, in a new transaction.

    Fair share, round-robin: the tenant with the fewest running jobs goes first, among those
    the one a worker served longest ago (``tenants.dispatched_at``), and its oldest queued job.
    So a tenant's burst delays another tenant's job by at most one job slot. The choice is
    read first; then the tenant's row is written (a row lock on PostgreSQL, the write lock on
    SQLite) so its running count is exact under ``running_limit`` while claims race, and the
    job is claimed by compare-and-set.
    """
    running = (
        select(Job.tenant_id, func.count().label("n"))
        .where(Job.status.in_(ACTIVE))
        .group_by(Job.tenant_id)
        .subquery()
    )
    busy = func.coalesce(running.c.n, 0)
    query = (
        select(Job.id, Job.tenant_id)
        .join(Tenant, Tenant.id == Job.tenant_id)
        .outerjoin(running, running.c.tenant_id == Job.tenant_id)
        .where(Job.status == JobStatus.QUEUED, Job.attempt < max_attempts)
        .order_by(busy, Tenant.dispatched_at.asc().nulls_first(), Job.created_at, Job.id)
        .limit(1)
    )
    if running_limit is not None:
        query = query.where(busy < running_limit)
    chosen = session.execute(query).first()
    if chosen is None:
        return None
    job_id, tenant_id = chosen
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(dispatched_at=utcnow()))
    if running_limit is not None and running_by_tenant(session).get(tenant_id, 0) >= running_limit:
        return job_id, None
    return job_id, claim(session, job_id, max_attempts)


def claimable_count(session: Session, max_attempts: int, running_limit: int | None) -> int:
    """Queued jobs that could start now: each tenant's, up to what ``running_limit`` leaves
    it."""
    queued = session.execute(
        select(Job.tenant_id, func.count())
        .where(Job.status == JobStatus.QUEUED, Job.attempt < max_attempts)
        .group_by(Job.tenant_id)
    )
    if running_limit is None:
        return sum(int(n) for _, n in queued)
    running = running_by_tenant(session)
    return sum(
        max(0, min(int(n), running_limit - running.get(tenant_id, 0))) for tenant_id, n in queued
    )


def heartbeat(session: Session, job_id: str, attempt: int, **values: Any) -> bool | None:
    """Beat (with progress, phase...) and read back the cancel flag; None if not owned."""
    flag = session.execute(
        update(Job)
        .where(owned(job_id, attempt))
        .values(heartbeat_at=utcnow(), **values)
        .returning(Job.cancel_requested)
    ).scalar_one_or_none()
    return None if flag is None else bool(flag)


def record_preflight(
    session: Session,
    job_id: str,
    report: dict[str, Any],
    teachers: Iterable[tuple[str, dict[str, Any], dict[str, Any], list[dict[str, Any]]]],
) -> None:
    """Keep a preflight's report on the job, and what it settled about each teacher
    ``(id, signature, scores_choice, feature_layers)`` on the teacher: which output holds its
    scores and their kind are facts of the model, learnt once."""
    session.execute(update(Job).where(Job.id == job_id).values(preflight=report))
    for teacher_id, signature, choice, layers in teachers:
        session.execute(
            update(Teacher)
            .where(Teacher.id == teacher_id)
            .values(signature=signature, scores_choice=choice, feature_layers=layers)
        )


def add_metrics(session: Session, job_id: str, epoch: int, values: dict[str, float]) -> None:
    session.add(JobMetric(job_id=job_id, epoch=epoch, values=values))


def forget_metrics_after(session: Session, job_id: str, epoch: int) -> None:
    """Drop per-epoch rows that the checkpoint being resumed from does not cover."""
    session.execute(delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.epoch > epoch))


def finish(session: Session, job_id: str, attempt: int, status: JobStatus, **values: Any) -> bool:
    """End the attempt's job (failed, cancelled); False if the attempt no longer owns it."""
    result = session.execute(
        update(Job)
        .where(owned(job_id, attempt))
        .values(status=status, phase=JobPhase.DONE, finished_at=utcnow(), **values)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def succeed(
    session: Session,
    job_id: str,
    attempt: int,
    result: dict[str, Any],
    artifacts: dict[ArtifactFormat, tuple[str, str, int]],
) -> bool:
    """Succeed and record the artifacts ``{format: (storage key, sha256, size)}`` together,
    if this attempt still owns the job."""
    done = session.execute(
        update(Job)
        .where(owned(job_id, attempt))
        .values(
            status=JobStatus.SUCCEEDED,
            phase=JobPhase.DONE,
            progress=1.0,
            result=result,
            finished_at=utcnow(),
            heartbeat_at=utcnow(),
        )
    ).rowcount  # type: ignore[attr-defined]
    if not done:
        return False
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    session.add_all(
        Artifact(job_id=job_id, format=fmt, storage_key=key, sha256=sha256, size_bytes=size)
        for fmt, (key, sha256, size) in artifacts.items()
    )
    return True
