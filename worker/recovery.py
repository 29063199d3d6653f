"""Requeue jobs whose worker died: the database, not the broker, decides what still has to run."""

import logging
from datetime import timedelta

from sqlalchemy import select

from app.config import get_settings
from app.db import session_scope
from app.jobs.repository import claimable_count, requeue_or_end
from app.models import Job, JobStatus, utcnow
from app.queue import enqueue_after_commit, top_up

log = logging.getLogger(__name__)


def top_up_messages() -> int:
    """Make the broker hold a message for every queued job that could start now: one lost (a
    Redis restart without persistence, an API killed between commit and send) is sent again.
    A spare message costs a worker one query. Returns how many were sent."""
    settings = get_settings()
    with session_scope() as session:
        waiting = claimable_count(session, settings.job_max_attempts, settings.quota_running_jobs)
    sent = top_up(waiting)
    if sent:
        log.warning("jobs.messages_topped_up", extra={"sent": sent})
    return sent


def recover_stale_jobs() -> list[str]:
    """Jobs running without a heartbeat for ``job_stale_after_s``: requeue, or fail past the cap.

    Each change is a compare-and-set on status and heartbeat, so two recoverers never both act.
    """
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.job_stale_after_s)
    requeued = []
    with session_scope() as session:
        stale = session.execute(
            select(Job.id, Job.attempt).where(
                Job.status.in_([JobStatus.RUNNING, JobStatus.CANCELLING]), Job.heartbeat_at < cutoff
            )
        ).all()
        for job_id, attempt in stale:
            error = {
                "code": "worker_lost",
                "detail": f"The worker running this job was lost {attempt} times.",
            }
            if requeue_or_end(
                session,
                job_id,
                attempt,
                settings.job_max_attempts,
                Job.heartbeat_at < cutoff,
                error,
            ):
                enqueue_after_commit(session, job_id)
                requeued.append(job_id)
    if stale:
        log.warning("jobs.recovered", extra={"stale": len(stale), "requeued": len(requeued)})
    return requeued
