"""Retention: a succeeded job's student files are removed ``DISTILL_ARTIFACT_RETENTION_DAYS``
after it finished. The job stays (result, metrics, spec); its artifact rows go, and downloading or
serving its student answers 410 ``artifacts_expired``. Checkpoints need no schedule: they are
removed as each job ends (``worker.pipeline``)."""

import logging
from datetime import timedelta

from sqlalchemy import delete, select, update

from app.config import get_settings
from app.db import session_scope
from app.models import Artifact, Job, JobStatus, utcnow
from app.storage import get_store, keys

log = logging.getLogger(__name__)
# Jobs handled per run: a first run over a large backlog is spread over several ticks.
BATCH = 500


def expire_artifacts() -> list[str]:
    """Remove the student files of jobs that succeeded more than the retention period ago;
    returns their ids. The rows change in one transaction, the files go once it commits."""
    days = get_settings().artifact_retention_days
    if days is None:
        return []
    cutoff = utcnow() - timedelta(days=days)
    store = get_store()
    with session_scope() as session:
        expired = list(
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
        if not expired:
            return []
        session.execute(delete(Artifact).where(Artifact.job_id.in_(expired)))
        session.execute(
            update(Job)
            .where(Job.id.in_(expired), Job.artifacts_removed_at.is_(None))
            .values(artifacts_removed_at=utcnow())
        )
        store.delete_after_commit(session, *(keys.artifacts(job_id) for job_id in expired))
    log.info("jobs.artifacts_expired", extra={"jobs": len(expired), "days": days})
    return expired
