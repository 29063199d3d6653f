"""Each claimed job runs in a process of its own, watched by the Celery pool process that claimed
it.

The pool process stays up for many tasks: a message when no job may run (its job cancelled,
or taken by another worker) costs one query, never a new process. A job gets a fresh process
(GPU memory returned when it ends, no CUDA state inherited), and the supervisor can end it: on a
cancel the job does not honour within ``cancel_grace_s`` (a teacher stuck in one batch), past
``job_time_limit_s``, or when another attempt owns the job. A job process that dies (killed,
out of memory) is requeued at once, fenced by its attempt number, and resumes from its
checkpoint; the recovery schedule remains for when the whole worker dies.
"""

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from sqlalchemy import select, true

from app.config import Settings, get_settings
from app.db import session_scope
from app.jobs.repository import requeue_or_end
from app.logs import log_context
from app.models import Job, JobStatus
from app.queue import enqueue_after_commit
from worker.pipeline import claim_next, finish
from worker.recovery import top_up_messages

log = logging.getLogger(__name__)
ACTIVE = (JobStatus.RUNNING, JobStatus.CANCELLING)


@dataclass(frozen=True)
class RowState:
    status: JobStatus
    attempt: int
    cancel_requested: bool


def _row(job_id: str) -> RowState:
    with session_scope() as session:
        status, attempt, cancel = session.execute(
            select(Job.status, Job.attempt, Job.cancel_requested).where(Job.id == job_id)
        ).one()
    return RowState(JobStatus(status), attempt, bool(cancel))


def _end(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the job process and everything it started; reap it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_next(torch_threads: int) -> None:
    """Claim the next job (the fair order: ``repository.claim_next``); run its attempt in a
    process of its own and watch it to the end."""
    settings = get_settings()
    claimed = claim_next(settings)
    if claimed is None:
        log.info("job.none_to_claim")
        return
    job_id, attempt = claimed
    with log_context(job_id=job_id):
        run_isolated(job_id, attempt, torch_threads, settings)
    # A slot is free: a job that waited for it (its tenant at DISTILL_QUOTA_RUNNING_JOBS) may
    # have had its message spent meanwhile; send it one now rather than at the next tick.
    top_up_messages()


def run_isolated(job_id: str, attempt: int, torch_threads: int, settings: Settings) -> None:
    """Run the claimed attempt in its own process and watch it to the end."""
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.job_process", job_id, str(attempt)],
        env={**os.environ, "DISTILL_TORCH_THREADS": str(torch_threads)},
        start_new_session=True,  # its own process group: ended with everything it started
    )
    try:
        supervise(job_id, attempt, process, settings)
    finally:
        _end(process)


def supervise(
    job_id: str, attempt: int, process: subprocess.Popen[bytes], settings: Settings
) -> None:
    """Watch the job process until it exits, ending it when it must; then settle a job whose
    process died without writing its end."""
    deadline = time.monotonic() + settings.job_time_limit_s
    cancel_seen: float | None = None
    while process.poll() is None:
        time.sleep(min(1.0, settings.heartbeat_interval_s))
        row = _row(job_id)
        now = time.monotonic()
        if row.attempt != attempt or row.status not in ACTIVE:
            _end(process)  # another attempt owns the job now, or it was ended for it
            return
        if row.cancel_requested:
            cancel_seen = cancel_seen or now
            if now - cancel_seen > settings.cancel_grace_s:
                _end(process)
                finish(
                    job_id,
                    attempt,
                    JobStatus.CANCELLED,
                    error={
                        "code": "cancelled",
                        "detail": "Cancelled by request; the job's process did not stop within "
                        f"{settings.cancel_grace_s:g} s and was ended.",
                    },
                )
                return
        if now > deadline:
            _end(process)
            finish(
                job_id,
                attempt,
                JobStatus.FAILED,
                error={
                    "code": "time_limit",
                    "detail": f"The job ran past DISTILL_JOB_TIME_LIMIT_S "
                    f"({settings.job_time_limit_s} s) and was ended.",
                },
            )
            return
    if process.returncode != 0:
        requeue_dead(job_id, attempt, process.returncode, settings)


def requeue_dead(job_id: str, attempt: int, returncode: int, settings: Settings) -> None:
    """The job process died without writing its end: requeue the job at once (it resumes from
    its checkpoint), cancel it if that was asked, or fail it past the attempt cap."""
    how = f"signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    log.warning("job.process_died", extra={"job_id": job_id, "attempt": attempt, "how": how})
    error = {
        "code": "job_process_died",
        "detail": f"The job's process died ({how}) on each of its {attempt} attempts (out of "
        "memory?).",
    }
    with session_scope() as session:
        if requeue_or_end(session, job_id, attempt, settings.job_max_attempts, true(), error):
            enqueue_after_commit(session, job_id)
