"""Thin tasks: the logic lives in plain functions that tests call directly."""

from app.logs import log_context
from app.queue import TaskName
from worker import recovery, supervisor
from worker.celery_app import celery_app, job_torch_threads


@celery_app.task(name=TaskName.DISTILL)
def distill(job_id: str) -> None:
    with log_context(job_id=job_id):
        supervisor.run_isolated(job_id, job_torch_threads())


@celery_app.task(name=TaskName.RECOVER)
def recover_jobs() -> list[str]:
    """Requeue jobs whose worker died, and send again the messages of queued jobs no worker took."""
    return recovery.recover_stale_jobs() + recovery.resend_lost_messages()
