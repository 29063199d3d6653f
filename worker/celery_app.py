"""The Celery worker, configured for long GPU jobs.

- acks_late + reject_on_worker_lost: a message is acknowledged only when its job has finished;
- prefetch 1: a worker never holds a second job while it trains;
- each job runs in a fresh process of its own, which the pool process that claimed it watches
  (``worker.supervisor``): GPU memory is returned, no CUDA state crosses a fork, a job can be
  ended; pool processes never touch CUDA, and a message with nothing to run costs no process;
- a message names no job: it is a turn to claim the next job the database chooses (fair among
  tenants: ``repository.claim_next``);
- the periodic recovery task requeues jobs whose worker died and makes up lost messages (see
  worker/recovery.py); an hourly task applies the artifact retention (worker/retention.py);
- each job process takes its pool process's share of the CPU cores for torch's threads (see
  ``DISTILL_TORCH_THREADS``), not all of them each: oversubscribed threads spin and thrash.
"""

import os
from typing import Any

from celery import Celery
from celery.signals import celeryd_init, setup_logging, worker_process_init

from app.config import get_settings
from app.db import get_engine
from app.logs import configure_logging
from app.queue import TaskName, configure_celery

settings = get_settings()
# Retention is counted in days: an hourly look is soon enough.
RETENTION_INTERVAL_S = 3600.0
celery_app = Celery("distill", include=["worker.tasks"])
configure_celery(celery_app, settings)
celery_app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # The supervisor ends a job at job_time_limit_s itself; Celery's limit is the backstop.
    task_time_limit=settings.job_time_limit_s + 600,
    worker_hijack_root_logger=False,
    beat_schedule={
        "recover-stale-jobs": {
            "task": TaskName.RECOVER,
            "schedule": settings.recovery_interval_s,
            # A tick that waits behind a long job is dropped; the next one will do.
            "options": {"expires": 0.9 * settings.recovery_interval_s},
        },
        "expire-artifacts": {
            "task": TaskName.EXPIRE_ARTIFACTS,
            "schedule": RETENTION_INTERVAL_S,
            "options": {"expires": 0.9 * RETENTION_INTERVAL_S},
        },
    },
)


pool_processes = 1


@setup_logging.connect
def _set_up_logging(**_: object) -> None:
    # Connected, this replaces Celery's own logging set-up: its lines and ours, one format.
    configure_logging(settings)


@celeryd_init.connect
def _remember_pool_size(options: dict[str, Any], **_: object) -> None:
    global pool_processes  # set in the parent, inherited by the forked pool processes
    pool_processes = int(options.get("concurrency") or os.cpu_count() or 1)


@worker_process_init.connect
def _set_up_pool_process(**_: object) -> None:
    # Pooled connections must not be shared with the parent process.
    get_engine().dispose(close=False)


def job_torch_threads() -> int:
    """torch threads for a job process: the setting, else this host's cores shared among the
    worker's pool processes."""
    cores = len(os.sched_getaffinity(0))
    return settings.torch_threads or max(1, cores // pool_processes)
