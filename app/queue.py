"""The Celery client: the API (and the worker's recovery task) send work by task name only.

Messages carry a job id, never an object; the database row is the source of truth.
"""

from enum import StrEnum
from functools import lru_cache
from typing import Any

from celery import Celery
from sqlalchemy import event
from sqlalchemy.orm import Session

from app.config import Settings, get_settings

PENDING_TASKS = "distill_pending_tasks"
QUEUE = "distill"


class TaskName(StrEnum):
    DISTILL = "distill.run_job"
    RECOVER = "distill.recover_jobs"


def configure_celery(app: Celery, settings: Settings) -> None:
    app.conf.broker_url = settings.resolved_broker_url
    if settings.embedded_broker:
        folder = settings.broker_dir
        folder.mkdir(parents=True, exist_ok=True)
        app.conf.broker_transport_options = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "store_processed": False,
        }
    else:
        # Redis redelivers an unacknowledged message after this long: it must outlast any job.
        app.conf.broker_transport_options = {"visibility_timeout": settings.job_time_limit_s + 3600}
    app.conf.task_default_queue = QUEUE
    app.conf.task_ignore_result = True
    app.conf.broker_connection_retry_on_startup = True


@lru_cache
def get_celery() -> Celery:
    app = Celery("distill")
    configure_celery(app, get_settings())
    return app


def enqueue_after_commit(session: Session, task: TaskName, *args: Any) -> None:
    """Send the task once the session's transaction commits; a rollback sends nothing."""
    session.info.setdefault(PENDING_TASKS, []).append((task, args))


@event.listens_for(Session, "after_commit")
def _send_pending(session: Session) -> None:
    for task, args in session.info.pop(PENDING_TASKS, []):
        get_celery().send_task(task, args=args)


@event.listens_for(Session, "after_soft_rollback")
def _drop_pending(session: Session, _previous_transaction: Any) -> None:
    session.info.pop(PENDING_TASKS, None)
