"""The Celery client: the API (and the worker's recovery task) send work by task name only.

A message carries no job: it is a turn for one worker to run the next job, chosen by the
database (``repository.claim_next``: round-robin over tenants), so a tenant's burst never forms
a queue in front of another tenant's job. Each queued job has one message sent for it; a lost
one is made up by the recovery task (``top_up``). The database row is the source of truth.
"""

import logging
from enum import StrEnum
from functools import lru_cache

from celery import Celery
from kombu.exceptions import ChannelError
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.errors import BrokerUnavailable
from app.jobs import repository

log = logging.getLogger(__name__)
PENDING_JOBS = "distill_pending_jobs"
QUEUE = "distill"
# Recovery runs on its own queue, so it is never stuck behind long training jobs.
CONTROL_QUEUE = "distill-control"


class TaskName(StrEnum):
    DISTILL = "distill.run_next_job"
    RECOVER = "distill.recover_jobs"
    EXPIRE_ARTIFACTS = "distill.expire_artifacts"


def configure_celery(app: Celery, settings: Settings) -> None:
    app.conf.broker_url = settings.resolved_broker_url
    if settings.embedded_broker:
        folder = settings.broker_dir
        folder.mkdir(parents=True, exist_ok=True)
        app.conf.broker_transport_options = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            # Exchange metadata; kombu's default is ./control in the working directory.
            "control_folder": str(folder / "control"),
            "store_processed": False,
            # A folder poll costs a directory listing; kombu's 1 s default makes every message
            # (a cancelled job's included) wait up to a second.
            "polling_interval": 0.1,
        }
    else:
        # Redis redelivers an unacknowledged message after this long: it must outlast any job.
        app.conf.broker_transport_options = {
            "visibility_timeout": settings.job_time_limit_s + 3600,
            "polling_interval": 0.1,
        }
    app.conf.task_default_queue = QUEUE
    app.conf.task_routes = {
        TaskName.RECOVER: {"queue": CONTROL_QUEUE},
        TaskName.EXPIRE_ARTIFACTS: {"queue": CONTROL_QUEUE},
    }
    app.conf.task_ignore_result = True
    app.conf.broker_connection_retry_on_startup = True


@lru_cache
def get_celery() -> Celery:
    app = Celery("distill")
    configure_celery(app, get_settings())
    return app


def enqueue_after_commit(session: Session, job_id: str) -> None:
    """Send a message for the queued job once the session's transaction commits
    (``send_pending``); a rollback sends nothing."""
    session.info.setdefault(PENDING_JOBS, []).append(job_id)


def queue_depth() -> int:
    """Messages waiting in the broker's job queue (not those workers hold)."""
    with get_celery().connection_for_write() as connection:
        try:
            declared = connection.default_channel.queue_declare(queue=QUEUE, passive=True)
        except ChannelError:  # Redis: an empty queue has no key, so it "does not exist"
            return 0
        return int(declared.message_count)


def top_up(waiting: int) -> int:
    """Send messages until the broker holds one per job that could run now (``waiting``); a
    message lost with a Redis restart, or never sent by an API process that died between
    commit and send, is made up. Returns how many were sent."""
    missing = max(0, waiting - queue_depth())
    for _ in range(missing):
        get_celery().send_task(TaskName.DISTILL)
    return missing


def send_pending(session: Session) -> None:
    """Send the jobs queued on a session that has just committed.

    A job whose message cannot be sent is marked failed rather than left queued forever, and the
    caller gets a 503 that says so.
    """
    failed = []
    for job_id in session.info.pop(PENDING_JOBS, []):
        try:
            get_celery().send_task(TaskName.DISTILL)
        except Exception:
            log.exception("queue.send_failed", extra={"job_id": job_id})
            failed.append(job_id)
    if failed:
        repository.fail_unqueued(session, failed)
        session.commit()
        raise BrokerUnavailable(
            f"The message broker is unreachable; job(s) {', '.join(failed)} were not queued "
            "and are marked failed. Try again once the broker is back."
        )
