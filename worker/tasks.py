"""Thin tasks: the logic lives in plain functions that tests call directly."""

from app.queue import TaskName
from worker import recovery, retention, supervisor
from worker.celery_app import celery_app, job_torch_threads


@celery_app.task(name=TaskName.DISTILL)
def distill() -> None:
    """A worker's turn: run the next job the database chooses."""
    supervisor.run_next(job_torch_threads())


@celery_app.task(name=TaskName.RECOVER)
def recover_jobs() -> list[str]:
    """Requeue jobs whose worker died, and make up the messages of queued jobs the broker lost."""
    requeued = recovery.recover_stale_jobs()
    recovery.top_up_messages()
    return requeued


@celery_app.task(name=TaskName.EXPIRE_ARTIFACTS)
def expire_artifacts() -> list[str]:
    """Remove the students of jobs past ``DISTILL_ARTIFACT_RETENTION_DAYS``."""
    return retention.expire_artifacts()
