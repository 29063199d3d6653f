"""One job, start to finish: claim -> validate -> teacher outputs -> train -> evaluate -> export ->
finalize. Database sessions are short and never held across slow work."""

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import delete, select, update

from app.config import Settings, get_settings
from app.db import session_scope
from app.errors import AppError
from app.jobs.schemas import DistillationSpec
from app.jobs.service import transition
from app.ml.architectures import CnnSpec, build_student, parameter_count
from app.models import (
    Artifact,
    ArtifactFormat,
    Dataset,
    Job,
    JobMetric,
    JobPhase,
    JobStatus,
    Teacher,
    TeacherFormat,
    utcnow,
)
from app.storage import get_store, sha256_file
from worker.checkpoints import load_checkpoint, save_checkpoint
from worker.data import DatasetArrays, load_builtin, load_uploaded
from worker.evaluation import logit_metrics, onnx_latency_ms, per_class_accuracy
from worker.export import export_onnx, write_artifact
from worker.losses import build_loss
from worker.teacher_cache import cache_key, cached_teacher_logits
from worker.teachers import TeacherRunner, ensemble_logits
from worker.training.loop import Split, predict_logits, train

log = logging.getLogger(__name__)
TEACHER_CACHE_PREFIX = "cache/teacher-outputs"
VALIDATION_FRACTION = 0.1
MAX_VALIDATION = 10_000


class JobFailure(Exception):
    """A failure to report on the job as it is (no traceback needed)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


@dataclass(frozen=True)
class TeacherRecord:
    id: str
    format: str
    sha256: str
    path: Path
    size_bytes: int
    parameter_count: int
    input_shape: tuple[int, ...]
    num_classes: int
    architecture: dict[str, Any] | None


class JobReporter:
    """The MetricSink of one job: phase, progress and heartbeat, metrics, cancel flag."""

    def __init__(self, job_id: str, interval_s: float) -> None:
        self.job_id = job_id
        self.interval_s = interval_s
        self._last_beat = 0.0
        self._fraction = 0.0
        self._cancel_requested = False

    def _beat(self, **values: Any) -> None:
        """Write the heartbeat and the latest progress; read back the cancel flag."""
        with session_scope() as session:
            session.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(heartbeat_at=utcnow(), progress=round(self._fraction, 4), **values)
            )
            self._cancel_requested = bool(
                session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id))
            )
        self._last_beat = time.monotonic()

    def phase(self, phase: JobPhase) -> None:
        log.info("job.phase", extra={"job_id": self.job_id, "phase": phase})
        self._beat(phase=phase)

    def progress(self, fraction: float) -> None:
        # Throttled: one small write every interval, however fast the steps are.
        self._fraction = fraction
        if time.monotonic() - self._last_beat >= self.interval_s:
            self._beat()

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        with session_scope() as session:
            session.add(JobMetric(job_id=self.job_id, epoch=epoch, values=values))
        self._beat()

    def should_stop(self) -> bool:
        return self._cancel_requested


def claim(job_id: str, max_attempts: int) -> bool:
    """queued -> running in one compare-and-set; a duplicate delivery finds nothing to claim."""
    with session_scope() as session:
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.attempt < max_attempts)
            .values(
                status=JobStatus.RUNNING,
                phase=JobPhase.VALIDATING,
                attempt=Job.attempt + 1,
                progress=0.0,
                started_at=utcnow(),
                heartbeat_at=utcnow(),
                error=None,
            )
        ).rowcount  # type: ignore[attr-defined]
    return bool(claimed)


def forget_metrics_after(job_id: str, epoch: int) -> None:
    """Drop per-epoch rows that the checkpoint being resumed from does not cover."""
    with session_scope() as session:
        session.execute(
            delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.epoch > epoch)
        )


def finish(job_id: str, status: JobStatus, **values: Any) -> bool:
    with session_scope() as session:
        return transition(
            session,
            job_id,
            [JobStatus.RUNNING, JobStatus.CANCELLING],
            status=status,
            phase=JobPhase.DONE,
            finished_at=utcnow(),
            heartbeat_at=utcnow(),
            **values,
        )


def choose_device(settings: Settings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def load_dataset(ref: str, num_classes: int) -> DatasetArrays:
    if ref.startswith("builtin:"):
        return load_builtin(ref)
    with session_scope() as session:
        dataset = session.get(Dataset, ref)
        if dataset is None:
            raise JobFailure("dataset_missing", f"Dataset {ref} no longer exists.")
        key = dataset.storage_key
    return load_uploaded(get_store().path(key), num_classes)


def _split_validation(
    x: np.ndarray, y: np.ndarray, logits: np.ndarray, seed: int
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Hold out part of the training set to pick the best epoch; the test set stays unseen."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = min(MAX_VALIDATION, max(1, int(len(x) * VALIDATION_FRACTION)))
    val, tr = order[:n_val], order[n_val:]
    return (x[tr], y[tr], logits[tr]), (x[val], y[val], logits[val])


def _to_split(arrays: tuple[np.ndarray, ...], device: torch.device) -> Split:
    x, y, logits = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays)
    return Split(x=x, y=y, teacher_logits=logits)


def _load_job(job_id: str) -> tuple[DistillationSpec, list[TeacherRecord], list[float], int]:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        spec = DistillationSpec.model_validate(job.spec)
        records = []
        for teacher_id, _ in spec.teacher_weights:
            teacher = session.get(Teacher, teacher_id)
            if teacher is None:
                raise JobFailure("teacher_missing", f"Teacher {teacher_id} was deleted.")
            records.append(
                TeacherRecord(
                    id=teacher.id,
                    format=teacher.format,
                    sha256=teacher.sha256,
                    path=get_store().path(teacher.storage_key),
                    size_bytes=teacher.size_bytes,
                    parameter_count=teacher.parameter_count,
                    input_shape=tuple(teacher.input_shape),
                    num_classes=teacher.num_classes,
                    architecture=teacher.architecture,
                )
            )
        return spec, records, [w for _, w in spec.teacher_weights], job.attempt


def teacher_latency_ms(teacher: TeacherRecord, runner: TeacherRunner) -> float:
    """Teacher latency measured exactly like the student's: its ONNX graph on onnxruntime."""
    if teacher.format == TeacherFormat.ONNX:
        return onnx_latency_ms(teacher.path, teacher.input_shape)
    assert runner.model is not None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "teacher.onnx"
        export_onnx(runner.model, teacher.input_shape, path)
        return onnx_latency_ms(path, teacher.input_shape)


def run_job(job_id: str) -> None:
    settings = get_settings()
    if not claim(job_id, settings.job_max_attempts):
        log.info("job.not_claimed", extra={"job_id": job_id})
        return
    started = time.perf_counter()
    reporter = JobReporter(job_id, settings.heartbeat_interval_s)
    try:
        _run(job_id, settings, reporter, started)
    except JobFailure as e:
        finish(job_id, JobStatus.FAILED, error={"code": e.code, "detail": e.detail})
    except AppError as e:
        finish(job_id, JobStatus.FAILED, error={"code": e.code, "detail": e.detail})
    except Exception as e:
        log.exception("job.crashed", extra={"job_id": job_id})
        finish(
            job_id,
            JobStatus.FAILED,
            error={"code": "internal_error", "detail": f"{type(e).__name__}: {e}"},
        )


def accuracy_of(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def _run(job_id: str, settings: Settings, reporter: JobReporter, started: float) -> None:
    spec, teachers, weights, attempt = _load_job(job_id)
    teacher = teachers[0]  # every teacher of an ensemble shares its inputs and classes
    device = choose_device(settings)
    store = get_store()
    torch.manual_seed(spec.training.seed)

    reporter.phase(JobPhase.VALIDATING)
    data = load_dataset(spec.dataset, teacher.num_classes)
    if data.input_shape != teacher.input_shape:
        raise JobFailure(
            "shape_mismatch",
            f"Dataset samples are shaped {list(data.input_shape)}, "
            f"the teacher takes {list(teacher.input_shape)}.",
        )
    runners = [TeacherRunner(t.path, t.format, t.architecture, device) for t in teachers]

    reporter.phase(JobPhase.TEACHER_OUTPUTS)
    dataset_digest = data.digest()
    per_teacher = []
    cache_hits = []
    for record, runner in zip(teachers, runners, strict=True):
        teacher_logits, hit = cached_teacher_logits(
            store.path(TEACHER_CACHE_PREFIX),
            cache_key(record.sha256, dataset_digest),
            {"train": data.x_train, "test": data.x_test},
            runner.logits,
        )
        per_teacher.append(teacher_logits)
        cache_hits.append(hit)
    temperature = float(getattr(spec.distillation, "temperature", 1.0))
    logits = {
        split: ensemble_logits([t[split] for t in per_teacher], weights, temperature)
        for split in ("train", "test")
    }
    # Label-free: on an unlabelled transfer set the teacher's top-1 predictions stand in for
    # labels (for the cross-entropy terms and for choosing the best epoch).
    y_train = logits["train"].argmax(axis=1) if data.y_train is None else data.y_train
    train_arrays, val_arrays = _split_validation(
        data.x_train, y_train, logits["train"], spec.training.seed
    )
    train_split, val_split = _to_split(train_arrays, device), _to_split(val_arrays, device)
    test_split = _to_split((data.x_test, data.y_test, logits["test"]), device)

    reporter.phase(JobPhase.TRAINING)
    student = build_student(
        spec.student, teacher.input_shape, teacher.num_classes, fit_inputs=train_split.x
    ).to(device)
    if isinstance(spec.student, CnnSpec):
        # NHWC: oneDNN (CPU) and cuDNN (tensor cores) run convolutions faster in this layout.
        student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    checkpoint_path = store.path(f"checkpoints/{job_id}/last.safetensors")
    resume = load_checkpoint(checkpoint_path)
    resumed_from_epoch = resume.epoch if resume else None
    forget_metrics_after(job_id, resumed_from_epoch or 0)
    if resume is not None:
        log.info("job.resume", extra={"job_id": job_id, "epoch": resumed_from_epoch})
    outcome = train(
        student,
        build_loss(**spec.distillation.model_dump()),
        train_split,
        val_split,
        spec.training,
        reporter,
        reporter.should_stop,
        lambda state: save_checkpoint(state, checkpoint_path),
        resume=resume,
        # bf16 autocast on CUDA: matmuls on tensor cores; losses upcast to float32 themselves.
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
    )
    if outcome.stopped:
        finish(job_id, JobStatus.CANCELLED, error={"code": "cancelled", "detail": "Cancelled."})
        return

    reporter.phase(JobPhase.EVALUATING)
    student.load_state_dict(outcome.state.best_state)
    student_logits = predict_logits(student, test_split.x)
    student_test = logit_metrics(student_logits, test_split.teacher_logits, test_split.y)
    teacher_test = logit_metrics(test_split.teacher_logits, test_split.teacher_logits, test_split.y)
    student_parameters = parameter_count(student)
    teacher_parameters = sum(t.parameter_count for t in teachers)
    classes = data.classes + [str(i) for i in range(len(data.classes), teacher.num_classes)]
    result: dict[str, Any] = {
        "student_accuracy": student_test["accuracy"],
        "teacher_accuracy": teacher_test["accuracy"],
        "accuracy_retained": 100.0 * student_test["accuracy"] / teacher_test["accuracy"]
        if teacher_test["accuracy"]
        else None,
        "agreement": student_test["agreement"],
        "kl_to_teacher": student_test["kl_to_teacher"],
        "student_ece": student_test["ece"],
        "teacher_ece": teacher_test["ece"],
        "student_per_class_accuracy": per_class_accuracy(
            student_logits, test_split.y, teacher.num_classes
        ),
        "teacher_per_class_accuracy": per_class_accuracy(
            test_split.teacher_logits, test_split.y, teacher.num_classes
        ),
        "student_parameters": student_parameters,
        "teacher_parameters": teacher_parameters,
        "compression_ratio": teacher_parameters / student_parameters,
        "teachers": [
            {
                "id": record.id,
                "weight": weight,
                "accuracy": accuracy_of(logits_of["test"], data.y_test),
            }
            for record, weight, logits_of in zip(teachers, weights, per_teacher, strict=True)
        ],
        "best_epoch": outcome.state.best_epoch,
        "best_val_accuracy": outcome.state.best_val_accuracy,
        "epochs_run": outcome.state.epoch,
        "early_stopped": outcome.early_stopped,
        "resumed_from_epoch": resumed_from_epoch,
        "teacher_outputs_cached": all(cache_hits),
        "label_free": data.y_train is None,
        "train_samples": len(train_split),
        "val_samples": len(val_split),
        "test_samples": len(test_split),
        "device": str(device),
    }

    reporter.phase(JobPhase.EXPORTING)
    artifact_prefix = f"artifacts/{job_id}/attempt-{attempt}"
    paths = write_artifact(
        store.path(artifact_prefix),
        model=student,
        input_shape=teacher.input_shape,
        manifest_fields={
            "job_id": job_id,
            "student": spec.student.model_dump(mode="json"),
            "classes": classes,
            "metrics": result,
            "teachers": [
                {"id": t.id, "sha256": t.sha256, "format": t.format, "weight": w}
                for t, w in zip(teachers, weights, strict=True)
            ],
            "dataset": {"ref": spec.dataset, "sha256": dataset_digest},
        },
    )
    student_latency = onnx_latency_ms(paths[ArtifactFormat.ONNX], teacher.input_shape)
    # An ensemble answers once all its members have: their latencies add up.
    teacher_latency = sum(teacher_latency_ms(t, r) for t, r in zip(teachers, runners, strict=True))
    result |= {
        "student_size_bytes": paths[ArtifactFormat.ONNX].stat().st_size,
        "teacher_size_bytes": sum(t.size_bytes for t in teachers),
        "student_latency_ms": student_latency,
        "teacher_latency_ms": teacher_latency,
        "speedup": teacher_latency / student_latency,
        "wall_seconds": time.perf_counter() - started,
    }
    if _finalize(job_id, artifact_prefix, paths, result):
        store.delete_tree(f"checkpoints/{job_id}")


def _finalize(
    job_id: str, prefix: str, paths: dict[ArtifactFormat, Path], result: dict[str, Any]
) -> bool:
    with session_scope() as session:
        done = transition(
            session,
            job_id,
            [JobStatus.RUNNING, JobStatus.CANCELLING],
            status=JobStatus.SUCCEEDED,
            phase=JobPhase.DONE,
            progress=1.0,
            result=result,
            finished_at=utcnow(),
            heartbeat_at=utcnow(),
        )
        if not done:
            log.warning("job.finalize_lost", extra={"job_id": job_id})
            return False
        session.execute(delete(Artifact).where(Artifact.job_id == job_id))
        for fmt, path in paths.items():
            session.add(
                Artifact(
                    job_id=job_id,
                    format=fmt,
                    storage_key=f"{prefix}/{path.name}",
                    sha256=sha256_file(path),
                    size_bytes=path.stat().st_size,
                )
            )
    return True
