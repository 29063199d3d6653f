"""Thin tasks: the logic lives in plain functions that tests call directly."""

from app.queue import TaskName
from worker import recovery, supervisor
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
