"""One job, start to finish: claim -> read -> recipe -> finalize. The job state machine and nothing
else: the distillation itself is ``worker.recipe`` (database-free), the attempt's writes are
``worker.attempt``. Database sessions are short and never held across slow work."""

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from sqlalchemy import select

from app.config import Settings, get_settings
from app.datasets.arrays import DatasetArrays
from app.datasets.loading import load_builtin, load_uploaded
from app.datasets.text import TextRecords
from app.db import session_scope
from app.errors import AppError
from app.jobs import repository
from app.jobs.preflight import PreflightReport
from app.jobs.schemas import DistillationSpec
from app.ml.layers import FeatureLayer
from app.ml.signature import ModelSignature
from app.ml.teacher_formats import ScoresChoice
from app.models import ArtifactFormat, Dataset, Job, JobPhase, JobStatus, JobTeacher, Teacher
from app.storage import get_store, keys, sha256_file
from worker.attempt import Attempt, JobSuperseded
from worker.recipe import Cancelled, DistillationRecipe, JobFailure, RecipeInputs
from worker.teachers import TeacherRecord

log = logging.getLogger(__name__)


def claim(job_id: str, max_attempts: int) -> int | None:
    with session_scope() as session:
        return repository.claim(session, job_id, max_attempts)


def claim_next(settings: Settings) -> tuple[str, int] | None:
    """Claim the next job by the fair order (``repository.claim_next``): ``(job id, attempt)``,
    or None when no queued job may run now."""
    while True:  # each lost race means a job was claimed: the queue shrinks, this ends
        with session_scope() as session:
            claimed = repository.claim_next(
                session, settings.job_max_attempts, settings.quota_running_jobs
            )
        if claimed is None:
            return None
        job_id, attempt = claimed
        if attempt is not None:
            return job_id, attempt


def finish(job_id: str, attempt: int, status: JobStatus, **values: object) -> bool:
    """End the attempt's job; the checkpoint goes with it."""
    with session_scope() as session:
        done = repository.finish(session, job_id, attempt, status, **values)
    if done:
        get_store().delete_tree(keys.checkpoints(job_id))
    return done


def choose_device(settings: Settings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def load_dataset(ref: str) -> DatasetArrays | TextRecords:
    if ref.startswith("builtin:"):
        return load_builtin(ref)
    with session_scope() as session:
        dataset = session.get(Dataset, ref)
        if dataset is None:
            raise JobFailure("dataset_missing", f"Dataset {ref} no longer exists.")
        key = dataset.storage_key
        signature = ModelSignature.model_validate(dataset.signature)
    return load_uploaded(get_store().path(key), signature.scores.classes, signature.preprocessing)


def read_job(
    job_id: str,
) -> tuple[str, DistillationSpec, list[TeacherRecord], PreflightReport | None]:
    """The job's tenant, spec, teachers in order and submission preflight, read in one short
    session."""
    store = get_store()
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        tenant_id = job.tenant_id
        spec = DistillationSpec.model_validate(job.spec)
        preflight = None if job.preflight is None else PreflightReport.model_validate(job.preflight)
        members = session.scalars(
            select(JobTeacher).where(JobTeacher.job_id == job_id).order_by(JobTeacher.position)
        )
        records = []
        for member in members:
            teacher = session.get(Teacher, member.teacher_id)
            assert teacher is not None  # deleting a teacher deletes its memberships
            records.append(
                TeacherRecord(
                    id=teacher.id,
                    format=teacher.format,
                    sha256=teacher.sha256,
                    path=store.path(teacher.storage_key),
                    size_bytes=teacher.size_bytes,
                    parameter_count=teacher.parameter_count,
                    signature=ModelSignature.model_validate(teacher.signature),
                    architecture=teacher.architecture,
                    scores_choice=None
                    if teacher.scores_choice is None
                    else ScoresChoice.model_validate(teacher.scores_choice),
                    feature_layers=tuple(
                        FeatureLayer.model_validate(layer) for layer in teacher.feature_layers or []
                    ),
                )
            )
    if len(records) != len(spec.teacher_weights):
        missing = {t for t, _ in spec.teacher_weights} - {r.id for r in records}
        raise JobFailure("teacher_missing", f"Teacher {', '.join(sorted(missing))} was deleted.")
    return tenant_id, spec, records, preflight


def run_job(job_id: str) -> None:
    """Claim the job and run it in this process (tests and tools; the worker runs each job in
    a process of its own: ``worker.supervisor``)."""
    attempt = claim(job_id, get_settings().job_max_attempts)
    if attempt is None:
        log.info("job.not_claimed", extra={"job_id": job_id})
        return
    run_attempt(job_id, attempt)


def run_attempt(job_id: str, attempt: int, on_stall: Callable[[], None] | None = None) -> None:
    """Run a claimed attempt to its end, written as the job's status. ``on_stall``: what the
    heartbeat thread does when the job shows no progress for ``stall_timeout_s``."""
    started = time.perf_counter()  # the job's wall time counts reading its inputs too
    settings = get_settings()
    with Attempt(
        job_id,
        attempt,
        settings.heartbeat_interval_s,
        stall_timeout_s=settings.stall_timeout_s,
        on_stall=on_stall,
    ) as events:
        _run_attempt(job_id, attempt, events, settings, started)


def _run_attempt(
    job_id: str, attempt: int, events: Attempt, settings: Settings, started: float
) -> None:
    """One claimed attempt, its end written as the job's status."""
    try:
        tenant_id, spec, teachers, preflight = read_job(job_id)
        store = get_store()
        inputs = RecipeInputs(
            job_id=job_id,
            spec=spec,
            teachers=teachers,
            data=load_dataset(spec.dataset),
            device=choose_device(settings),
            artifact_dir=store.path(keys.artifact(job_id, attempt)),
            cache_dir=store.path(keys.teacher_cache(tenant_id)),
            cache_max_bytes=settings.teacher_cache_max_bytes,
            token_cache_dir=store.path(keys.token_cache(tenant_id)),
            checkpoint=store.path(keys.checkpoint(job_id)),
            started=started,
            preflight=preflight,
        )
        output = DistillationRecipe(inputs, events).run()
        events.phase(JobPhase.DONE)  # the last cancel check
        finalize(job_id, attempt, output.paths, output.result.model_dump(mode="json"))
    except JobSuperseded:
        log.warning("job.superseded", extra={"job_id": job_id, "attempt": attempt})
    except Cancelled:
        finish(
            job_id,
            attempt,
            JobStatus.CANCELLED,
            error={"code": "cancelled", "detail": "Cancelled by request."},
        )
    except JobFailure as e:
        finish(job_id, attempt, JobStatus.FAILED, error={"code": e.code, "detail": e.detail})
    except AppError as e:  # its extras too (a preflight's `label_offset`, `samples`, `rows`)
        error = {"code": e.code, "detail": e.detail, **e.extra}
        finish(job_id, attempt, JobStatus.FAILED, error=error)
    except Exception as e:
        log.exception("job.crashed", extra={"job_id": job_id})
        finish(
            job_id,
            attempt,
            JobStatus.FAILED,
            error={"code": "internal_error", "detail": f"{type(e).__name__}: {e}"},
        )


def finalize(
    job_id: str, attempt: int, paths: dict[ArtifactFormat, Path], result: dict[str, object]
) -> None:
    """Succeed and record the artifacts in one transaction, if this attempt still owns the job;
    then remove the checkpoint and the exports of earlier attempts."""
    store = get_store()
    prefix = keys.artifact(job_id, attempt)
    artifacts = {
        fmt: (f"{prefix}/{path.name}", sha256_file(path), path.stat().st_size)
        for fmt, path in paths.items()
    }
    with session_scope() as session:
        if not repository.succeed(session, job_id, attempt, result, artifacts):
            raise JobSuperseded(job_id)
    store.delete_tree(keys.checkpoints(job_id))
    # Exports of earlier attempts (superseded after exporting) belong to nobody now.
    for earlier in range(1, attempt):
        store.delete_tree(keys.artifact(job_id, earlier))
