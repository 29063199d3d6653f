"""The process one job attempt runs in: ``python -m worker.job_process <job id> <attempt>``,
started and watched by ``worker.supervisor``. Settings come from the environment, as everywhere.
"""

import ctypes
import logging
import os
import signal
import sys

from app.config import get_settings
from app.logs import bind_process, configure_logging
from app.models import JobStatus
from worker.pipeline import finish, run_attempt

log = logging.getLogger(__name__)
STALLED_EXIT = 70


PR_SET_PDEATHSIG = 1


def die_with_supervisor() -> None:
    """Linux: SIGKILL this process when its supervisor dies, as a lost machine would end both;
    a job process left running outside any worker would hold its GPU unseen. Its job is then
    requeued by the recovery schedule once its heartbeat is stale."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the supervisor died before the line above ran
            os._exit(1)


def main(argv: list[str]) -> int:
    job_id, attempt = argv[0], int(argv[1])
    die_with_supervisor()
    configure_logging()
    bind_process(job_id=job_id, attempt=attempt)
    import torch

    settings = get_settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    def stalled() -> None:
        # On the heartbeat thread: the job's thread is stuck (in one teacher batch, say).
        finish(
            job_id,
            attempt,
            JobStatus.FAILED,
            error={
                "code": "stalled",
                "detail": f"The job showed no progress for {settings.stall_timeout_s:g} s "
                "(DISTILL_STALL_TIMEOUT_S) and was ended: a teacher batch that never finishes?",
            },
        )
        os._exit(STALLED_EXIT)  # the stuck thread cannot be interrupted; the process can end

    run_attempt(job_id, attempt, on_stall=stalled)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
