from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from app.config import get_settings
from app.datasets.service import resolve_dataset
from app.errors import Conflict, InvalidSpec, NotFound
from app.jobs.features import resolve_layer_pairs
from app.jobs.schemas import DistillationSpec, FeatureMethod, JobOut
from app.ml.architectures import CnnSpec
from app.models import Job, JobMetric, JobPhase, JobStatus, Teacher, utcnow
from app.queue import enqueue_after_commit


def validate_spec(session: Session, spec: DistillationSpec) -> list[Teacher]:
    """Everything that can be checked before queueing, so a mistake is a 422, not a failed job.

    Defaults that depend on the models (a feature method's layers) are filled into ``spec``.
    """
    field = "teacher" if spec.teachers is None else "teachers"
    teachers = []
    for teacher_id, _ in spec.teacher_weights:
        teacher = session.get(Teacher, teacher_id)
        if teacher is None:
            raise InvalidSpec(f"No teacher with id {teacher_id}.", field=field)
        teachers.append(teacher)
    first = teachers[0]
    for other in teachers[1:]:
        if (other.input_shape, other.num_classes) != (first.input_shape, first.num_classes):
            raise InvalidSpec(
                f"An ensemble's teachers must share inputs and classes: {first.id} takes "
                f"{first.input_shape} with {first.num_classes} classes, {other.id} "
                f"{other.input_shape} with {other.num_classes}.",
                field=field,
            )
    dataset = resolve_dataset(session, spec.dataset)
    if list(dataset.input_shape) != list(first.input_shape):
        raise InvalidSpec(
            f"The dataset's samples are shaped {list(dataset.input_shape)} but the teacher takes "
            f"{first.input_shape}.",
            field="dataset",
        )
    if dataset.num_classes > first.num_classes:
        raise InvalidSpec(
            f"The dataset has {dataset.num_classes} classes but the teacher outputs only "
            f"{first.num_classes} logits.",
            field="dataset",
        )
    if isinstance(spec.student, CnnSpec) and len(first.input_shape) != 3:
        raise InvalidSpec(
            f"A cnn student needs image inputs [C, H, W]; these are {first.input_shape}.",
            field="student.architecture",
        )
    if isinstance(spec.distillation, FeatureMethod):
        if len(teachers) > 1:
            raise InvalidSpec(
                f"`{spec.distillation.method}` matches the layers of one teacher; an ensemble "
                "has no common layers. Use a logit method (e.g. `kd`) for ensembles.",
                field="teachers",
            )
        spec.distillation.layers = resolve_layer_pairs(
            spec.distillation,
            first,
            spec.student,
            dataset,
            get_settings().max_teacher_feature_bytes,
        )
    return teachers


def create_job(session: Session, spec: DistillationSpec) -> Job:
    teachers = validate_spec(session, spec)
    job = Job(
        spec=spec.model_dump(mode="json", exclude_none=True),
        teacher_id=teachers[0].id,
        dataset_ref=spec.dataset,
    )
    session.add(job)
    session.flush()
    enqueue_after_commit(session, job.id)
    return job


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"No job with id {job_id}.")
    return job


def latest_metrics(session: Session, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The last epoch's metrics of each job, in one query (a page of jobs costs no more)."""
    last_epoch = (
        select(JobMetric.job_id, func.max(JobMetric.epoch).label("epoch"))
        .where(JobMetric.job_id.in_(job_ids))
        .group_by(JobMetric.job_id)
        .subquery()
    )
    rows = session.scalars(
        select(JobMetric).join(
            last_epoch,
            (JobMetric.job_id == last_epoch.c.job_id) & (JobMetric.epoch == last_epoch.c.epoch),
        )
    )
    return {row.job_id: {"epoch": row.epoch, **row.values} for row in rows}


def jobs_out(session: Session, jobs: list[Job]) -> list[JobOut]:
    metrics = latest_metrics(session, [job.id for job in jobs])
    return [_job_out(job, metrics.get(job.id)) for job in jobs]


def job_out(session: Session, job: Job) -> JobOut:
    return jobs_out(session, [job])[0]


def _job_out(job: Job, metrics: dict[str, Any] | None) -> JobOut:
    return JobOut(
        id=job.id,
        status=job.status,
        phase=job.phase,
        progress=job.progress,
        attempt=job.attempt,
        spec=job.spec,
        teacher_id=job.teacher_id,
        dataset=job.dataset_ref,
        created_at=job.created_at,
        started_at=job.started_at,
        heartbeat_at=job.heartbeat_at,
        finished_at=job.finished_at,
        latest_metrics=metrics,
        result=job.result,
        error=job.error,
    )


def list_jobs(
    session: Session, *, limit: int, offset: int, status: JobStatus | None
) -> tuple[list[Job], int]:
    query = select(Job)
    if status is not None:
        query = query.where(Job.status == status)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    jobs = session.scalars(
        query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    )
    return list(jobs), total


def list_metrics(session: Session, job_id: str) -> list[JobMetric]:
    get_job(session, job_id)
    return list(
        session.scalars(
            select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.epoch)
        )
    )


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


def cancel_job(session: Session, job_id: str) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop at its next check."""
    job = get_job(session, job_id)
    changed = transition(
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
    if not changed:
        raise Conflict(f"Job {job_id} has already finished ({job.status}).", job_status=job.status)
    session.refresh(job)
    return job
