"""Requeue jobs whose worker died: the database, not the broker, decides what still has to run."""

import logging
from datetime import timedelta

from sqlalchemy import select

from app.config import get_settings
from app.db import session_scope
from app.jobs.repository import requeue_or_end, transition
from app.models import Job, JobStatus, utcnow
from app.queue import enqueue_after_commit

log = logging.getLogger(__name__)


def resend_lost_messages() -> list[str]:
    """Queued jobs whose message was sent ``queued_resend_after_s`` ago and that no worker has
    claimed: send the message again (a Redis restart without persistence, or an API killed between
    commit and send, loses it). A duplicate costs nothing: the claim is a compare-and-set.
    """
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.queued_resend_after_s)
    resent = []
    with session_scope() as session:
        waiting = session.scalars(
            select(Job.id).where(Job.status == JobStatus.QUEUED, Job.enqueued_at < cutoff)
        ).all()
        for job_id in waiting:
            if transition(
                session, job_id, [JobStatus.QUEUED], Job.enqueued_at < cutoff, enqueued_at=utcnow()
            ):
                enqueue_after_commit(session, job_id)
                resent.append(job_id)
    if resent:
        log.warning("jobs.resent", extra={"resent": len(resent)})
    return resent


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
