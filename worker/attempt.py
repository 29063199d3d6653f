"""One attempt at a job, as the database sees it: phases, progress and heartbeat, per-epoch
metrics, the cancel flag. Every write is fenced by the attempt number (``repository.owned``), so
an attempt that was superseded stops at its next write instead of overwriting a newer one."""

import logging
import time
from collections.abc import Callable

from sqlalchemy.orm import Session

from app.db import session_scope
from app.jobs import repository
from app.jobs.preflight import PreflightReport, PreflightTeacher
from app.models import JobPhase
from worker.recipe import Cancelled

log = logging.getLogger(__name__)


class JobSuperseded(Exception):
    """This attempt no longer owns the job (requeued after a missed heartbeat, or finished)."""


class Attempt:
    """The recipe's events for one attempt of a job, written to its row."""

    def __init__(self, job_id: str, attempt: int, interval_s: float) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.interval_s = interval_s
        self._last_beat = 0.0
        self._fraction = 0.0
        self._cancel_requested = False

    def _beat(self, then: Callable[[Session], None] | None = None, **values: object) -> None:
        """Write the heartbeat and the latest progress, read back the cancel flag, and make
        ``then``'s writes in the same transaction: they are fenced by the heartbeat's
        ownership check.

        Raises JobSuperseded when another attempt owns the job now, so this one stops.
        """
        with session_scope() as session:
            flag = repository.heartbeat(
                session, self.job_id, self.attempt, progress=round(self._fraction, 4), **values
            )
            if flag is None:
                raise JobSuperseded(self.job_id)  # rolls back: nothing is written
            if then is not None:
                then(session)
        self._cancel_requested = flag
        self._last_beat = time.monotonic()

    def phase(self, phase: JobPhase) -> None:
        log.info("job.phase", extra={"job_id": self.job_id, "phase": phase})
        self._beat(phase=phase)
        if self._cancel_requested:
            raise Cancelled(self.job_id)

    def preflight(self, report: PreflightReport, teachers: list[PreflightTeacher]) -> None:
        settled = [
            (
                t.id,
                t.signature.model_dump(mode="json"),
                t.choice.model_dump(mode="json"),
                [layer.model_dump() for layer in t.feature_layers],
            )
            for t in teachers
        ]
        report_json = report.model_dump(mode="json")
        self._beat(
            lambda session: repository.record_preflight(session, self.job_id, report_json, settled)
        )

    def progress(self, fraction: float) -> None:
        # Throttled: one small write every interval, however fast the steps are.
        self._fraction = fraction
        self.keep_alive()

    def keep_alive(self) -> None:
        """Heartbeat if one is due: for slow work outside the training loop too."""
        if time.monotonic() - self._last_beat >= self.interval_s:
            self._beat()

    def resumed(self, epoch: int) -> None:
        if epoch:
            log.info("job.resume", extra={"job_id": self.job_id, "epoch": epoch})
        self._beat(lambda session: repository.forget_metrics_after(session, self.job_id, epoch))

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        self._beat(lambda session: repository.add_metrics(session, self.job_id, epoch, values))

    def should_stop(self) -> bool:
        return self._cancel_requested
