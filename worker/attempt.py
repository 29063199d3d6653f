"""One attempt at a job, as the database sees it: phases, progress and heartbeat, per-epoch
metrics, the cancel flag. Every write is fenced by the attempt number (``repository.owned``), so
an attempt that was superseded stops at its next write instead of overwriting a newer one."""

import logging
import threading
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
    """The recipe's events for one attempt of a job, written to its row.

    Liveness and progress are apart: a background thread writes the heartbeat (with the latest
    progress, and reads back the cancel flag) every ``interval_s`` while the attempt is open,
    whatever the job is doing, so a teacher batch or a latency measurement that takes minutes
    never looks like a dead worker, and a stale heartbeat means the process is gone. The job's
    own thread raises ``Cancelled`` or ``JobSuperseded`` at its next check (``keep_alive``, a
    phase, the loop's ``should_stop``). Use it as a context manager.
    """

    def __init__(
        self,
        job_id: str,
        attempt: int,
        interval_s: float,
        stall_timeout_s: float | None = None,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.interval_s = interval_s
        # The watchdog: ``on_stall`` runs (on the heartbeat thread) when the job's thread has
        # shown no sign of progress for ``stall_timeout_s``.
        self.stall_timeout_s, self.on_stall = stall_timeout_s, on_stall
        self._last_progress = time.monotonic()
        self._fraction = 0.0
        self._cancel_requested = False
        self._superseded = False
        self.phase_name = JobPhase.VALIDATING  # the phase its claim set
        self._phase_started = time.monotonic()
        self._phase_seconds: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_forever, daemon=True, name="heartbeat")

    def __enter__(self) -> "Attempt":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat_forever(self) -> None:
        while not self._stop.wait(self.interval_s):
            stalled = time.monotonic() - self._last_progress
            if self.on_stall and self.stall_timeout_s and stalled > self.stall_timeout_s:
                log.error("job.stalled", extra={"job_id": self.job_id, "seconds": stalled})
                self.on_stall()
                return
            try:
                self._beat()
            except JobSuperseded:
                return  # the job's thread raises it at its next check
            except Exception:  # a database hiccup: the next beat may get through
                log.exception("job.heartbeat_failed", extra={"job_id": self.job_id})

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
                self._superseded = True
                raise JobSuperseded(self.job_id)  # rolls back: nothing is written
            if then is not None:
                then(session)
        self._cancel_requested = flag

    def phase(self, phase: JobPhase) -> None:
        """Enter ``phase``; the time spent in the one it ends is recorded with it."""
        log.info("job.phase", extra={"job_id": self.job_id, "phase": phase})
        now = time.monotonic()
        self._phase_seconds[self.phase_name] = round(
            self._phase_seconds.get(self.phase_name, 0.0) + now - self._phase_started, 3
        )
        self.phase_name, self._phase_started = phase, now
        self._last_progress = now
        self._beat(phase=phase, phase_seconds=dict(self._phase_seconds))
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
        self._fraction = fraction  # written by the next heartbeat
        self._last_progress = time.monotonic()

    def keep_alive(self) -> None:
        """A check between pieces of slow work outside the loop (teacher batches, latency runs).

        Raises:
            JobSuperseded: another attempt owns the job now.
            Cancelled: a cancel was requested.
        """
        self._last_progress = time.monotonic()
        if self._superseded:
            raise JobSuperseded(self.job_id)
        if self._cancel_requested:
            raise Cancelled(self.job_id)

    def resumed(self, epoch: int) -> None:
        if epoch:
            log.info("job.resume", extra={"job_id": self.job_id, "epoch": epoch})
        self._beat(lambda session: repository.forget_metrics_after(session, self.job_id, epoch))

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        self._last_progress = time.monotonic()
        self._beat(lambda session: repository.add_metrics(session, self.job_id, epoch, values))

    def should_stop(self) -> bool:
        if self._superseded:
            raise JobSuperseded(self.job_id)
        return self._cancel_requested
