"""Thin tasks: the logic lives in plain functions that tests call directly."""

from app.queue import TaskName
from worker import pipeline, recovery
from worker.celery_app import celery_app


@celery_app.task(name=TaskName.DISTILL)
def distill(job_id: str) -> None:
    pipeline.run_job(job_id)


@celery_app.task(name=TaskName.RECOVER)
def recover_jobs() -> list[str]:
    """Requeue jobs whose worker died, and send again the messages of queued jobs no worker took."""
    return recovery.recover_stale_jobs() + recovery.resend_lost_messages()
