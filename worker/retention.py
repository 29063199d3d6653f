"""Retention: a succeeded job's student files are removed ``DISTILL_ARTIFACT_RETENTION_DAYS``
after it finished. The job stays (result, metrics, spec); its artifact rows go, and downloading or
serving its student answers 410 ``artifacts_expired``. Checkpoints need no schedule: they are
removed as each job ends (``worker.pipeline``)."""

import logging
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update

from app.config import get_settings
from app.db import session_scope
from app.models import Artifact, Job, JobStatus, utcnow
from app.storage import get_store, keys

log = logging.getLogger(__name__)
# Jobs per transaction: a first run over a large backlog holds no lock for long.
BATCH = 500


def expire_artifacts() -> list[str]:
    """Remove the student files of jobs that succeeded more than the retention period ago;
    returns their ids. ``BATCH`` jobs per transaction, until none is left; each batch's files
    go once it commits."""
    days = get_settings().artifact_retention_days
    if days is None:
        return []
    cutoff = utcnow() - timedelta(days=days)
    expired: list[str] = []
    while batch := _expire_batch(cutoff):
        expired += batch
    if expired:
        log.info("jobs.artifacts_expired", extra={"jobs": len(expired), "days": days})
    return expired


def _expire_batch(cutoff: datetime) -> list[str]:
    store = get_store()
    with session_scope() as session:
        batch = list(
            session.scalars(
                select(Job.id)
                .where(
                    Job.status == JobStatus.SUCCEEDED,
                    Job.finished_at < cutoff,
                    Job.artifacts_removed_at.is_(None),
                )
                .limit(BATCH)
            )
        )
        if batch:
            session.execute(delete(Artifact).where(Artifact.job_id.in_(batch)))
            session.execute(
                update(Job).where(Job.id.in_(batch)).values(artifacts_removed_at=utcnow())
            )
            store.delete_after_commit(session, *(keys.artifacts(job_id) for job_id in batch))
    return batch
