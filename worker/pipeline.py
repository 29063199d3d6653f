"""One job, start to finish: claim -> validate -> teacher outputs -> train -> evaluate -> export ->
finalize. Database sessions are short and never held across slow work."""

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import delete, update

from app.config import Settings, get_settings
from app.db import session_scope
from app.errors import AppError
from app.jobs.schemas import DistillationSpec, FeatureMethod
from app.ml.architectures import CnnSpec, MlpSpec, build_student, parameter_count
from app.ml.layers import feature_layers
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
from worker.evaluation import accuracy, logit_metrics, onnx_latency_ms, per_class_accuracy
from worker.export import export_onnx, write_artifact
from worker.features import FeatureTap
from worker.losses import build_feature_loss, build_loss
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


class JobSuperseded(Exception):
    """This attempt no longer owns the job (requeued after a missed heartbeat, or finished)."""


class JobCancelled(Exception):
    """A cancel was requested; raised between phases."""


ACTIVE = (JobStatus.RUNNING, JobStatus.CANCELLING)


def owned(job_id: str, attempt: int) -> Any:
    """The condition every write of an attempt carries: it still owns the job."""
    return (Job.id == job_id) & (Job.attempt == attempt) & Job.status.in_(ACTIVE)


class JobReporter:
    """The MetricSink of one attempt: phase, progress and heartbeat, metrics, cancel flag."""

    def __init__(self, job_id: str, attempt: int, interval_s: float) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.interval_s = interval_s
        self._last_beat = 0.0
        self._fraction = 0.0
        self._cancel_requested = False

    def _beat(self, **values: Any) -> None:
        """Write the heartbeat and the latest progress; read back the cancel flag.

        Raises JobSuperseded when another attempt owns the job now, so this one stops.
        """
        with session_scope() as session:
            updated = session.execute(
                update(Job)
                .where(owned(self.job_id, self.attempt))
                .values(heartbeat_at=utcnow(), progress=round(self._fraction, 4), **values)
                .returning(Job.cancel_requested)
            ).scalar_one_or_none()
        if updated is None:
            raise JobSuperseded(self.job_id)
        self._cancel_requested = bool(updated)
        self._last_beat = time.monotonic()

    def phase(self, phase: JobPhase) -> None:
        log.info("job.phase", extra={"job_id": self.job_id, "phase": phase})
        self._beat(phase=phase)
        if self._cancel_requested:
            raise JobCancelled(self.job_id)

    def progress(self, fraction: float) -> None:
        # Throttled: one small write every interval, however fast the steps are.
        self._fraction = fraction
        self.keep_alive()

    def keep_alive(self) -> None:
        """Heartbeat if one is due: for slow work outside the training loop too."""
        if time.monotonic() - self._last_beat >= self.interval_s:
            self._beat()

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        self._beat()  # first: a superseded attempt must not write metrics
        with session_scope() as session:
            session.add(JobMetric(job_id=self.job_id, epoch=epoch, values=values))

    def should_stop(self) -> bool:
        return self._cancel_requested


def claim(job_id: str, max_attempts: int) -> int | None:
    """queued -> running in one compare-and-set; returns the attempt number, or None when there
    is nothing to claim (a duplicate delivery, a cancelled job, attempts used up)."""
    with session_scope() as session:
        return session.execute(
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
            .returning(Job.attempt)
        ).scalar_one_or_none()


def forget_metrics_after(job_id: str, epoch: int) -> None:
    """Drop per-epoch rows that the checkpoint being resumed from does not cover."""
    with session_scope() as session:
        session.execute(
            delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.epoch > epoch)
        )


def finish(job_id: str, attempt: int, status: JobStatus, **values: Any) -> bool:
    """End the attempt's job; the checkpoint goes with it."""
    with session_scope() as session:
        done = session.execute(
            update(Job)
            .where(owned(job_id, attempt))
            .values(status=status, phase=JobPhase.DONE, finished_at=utcnow(), **values)
        ).rowcount  # type: ignore[attr-defined]
    if done:
        get_store().delete_tree(f"checkpoints/{job_id}")
    return bool(done)


def choose_device(settings: Settings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def load_dataset(ref: str) -> DatasetArrays:
    if ref.startswith("builtin:"):
        return load_builtin(ref)
    with session_scope() as session:
        dataset = session.get(Dataset, ref)
        if dataset is None:
            raise JobFailure("dataset_missing", f"Dataset {ref} no longer exists.")
        key = dataset.storage_key
    return load_uploaded(get_store().path(key))


def split_validation(
    x: np.ndarray, y: np.ndarray, logits: np.ndarray, seed: int
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Hold out part of the training set to pick the best epoch; the test set stays unseen."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = min(MAX_VALIDATION, max(1, int(len(x) * VALIDATION_FRACTION)))
    val, tr = order[:n_val], order[n_val:]
    return (x[tr], y[tr], logits[tr]), (x[val], y[val], logits[val])


def to_split(arrays: tuple[np.ndarray, ...], device: torch.device) -> Split:
    x, y, logits = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays)
    return Split(x=x, y=y, teacher_logits=logits)


def _load_job(job_id: str) -> tuple[DistillationSpec, list[TeacherRecord], list[float]]:
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
        return spec, records, [w for _, w in spec.teacher_weights]


def prepare_feature_method(
    method: FeatureMethod,
    runner: TeacherRunner,
    train_split: Split,
    student: torch.nn.Sequential,
    student_spec: MlpSpec | CnnSpec,
    on_batch: Callable[[], None] | None = None,
) -> tuple[Split, torch.nn.Module, FeatureTap]:
    """What a feature method adds: the teacher's outputs at its layers for the training split
    (computed once: the inputs never change), the loss with adapters sized for each layer pair,
    and a tap on the student's layers."""
    assert method.layers is not None  # resolved at submission
    device = train_split.x.device
    features = runner.features(
        train_split.x.cpu().numpy(), [pair.teacher for pair in method.layers], on_batch=on_batch
    )
    input_shape = tuple(train_split.x.shape[1:])
    student_shapes = {
        layer.name: tuple(layer.shape)
        for layer in feature_layers(student_spec, input_shape, train_split.teacher_logits.shape[1])
    }
    student_paths = [pair.student for pair in method.layers]
    loss_fn = build_feature_loss(
        shapes=[
            (student_shapes[path], f.shape[1:])
            for path, f in zip(student_paths, features, strict=True)
        ],
        **method.model_dump(exclude={"layers"}),
    ).to(device)
    train_split = dataclasses.replace(
        train_split, teacher_features=tuple(torch.from_numpy(f).to(device) for f in features)
    )
    # Paths name modules of the architecture, after the student's input standardisation.
    return train_split, loss_fn, FeatureTap(student, student_paths, root=student[1])


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
    attempt = claim(job_id, settings.job_max_attempts)
    if attempt is None:
        log.info("job.not_claimed", extra={"job_id": job_id})
        return
    reporter = JobReporter(job_id, attempt, settings.heartbeat_interval_s)
    try:
        _run(job_id, attempt, settings, reporter, time.perf_counter())
    except JobSuperseded:
        log.warning("job.superseded", extra={"job_id": job_id, "attempt": attempt})
    except JobCancelled:
        finish(
            job_id,
            attempt,
            JobStatus.CANCELLED,
            error={"code": "cancelled", "detail": "Cancelled by request."},
        )
    except (JobFailure, AppError) as e:
        finish(job_id, attempt, JobStatus.FAILED, error={"code": e.code, "detail": e.detail})
    except Exception as e:
        log.exception("job.crashed", extra={"job_id": job_id})
        finish(
            job_id,
            attempt,
            JobStatus.FAILED,
            error={"code": "internal_error", "detail": f"{type(e).__name__}: {e}"},
        )


def _run(
    job_id: str, attempt: int, settings: Settings, reporter: JobReporter, started: float
) -> None:
    spec, teachers, weights = _load_job(job_id)
    teacher = teachers[0]  # every teacher of an ensemble shares its inputs and classes
    device = choose_device(settings)
    store = get_store()
    torch.manual_seed(spec.training.seed)

    reporter.phase(JobPhase.VALIDATING)
    data = load_dataset(spec.dataset)
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
            partial(runner.logits, on_batch=reporter.keep_alive),
            max_bytes=settings.teacher_cache_max_bytes,
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
    train_arrays, val_arrays = split_validation(
        data.x_train, y_train, logits["train"], spec.training.seed
    )
    train_split, val_split = to_split(train_arrays, device), to_split(val_arrays, device)
    test_split = to_split((data.x_test, data.y_test, logits["test"]), device)

    student = build_student(
        spec.student, teacher.input_shape, teacher.num_classes, fit_inputs=train_split.x
    ).to(device)
    method = spec.distillation
    student_tap = None
    loss_fn: torch.nn.Module
    if isinstance(method, FeatureMethod):
        train_split, loss_fn, student_tap = prepare_feature_method(
            method, runners[0], train_split, student, spec.student, reporter.keep_alive
        )
    else:
        loss_fn = build_loss(**method.model_dump())

    reporter.phase(JobPhase.TRAINING)
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
        loss_fn,
        train_split,
        val_split,
        spec.training,
        reporter,
        reporter.should_stop,
        lambda state: save_checkpoint(state, checkpoint_path),
        resume=resume,
        # bf16 autocast on CUDA: matmuls on tensor cores; losses upcast to float32 themselves.
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
        student_tap=student_tap,
    )
    if student_tap is not None:
        student_tap.remove()  # evaluation and export see the plain student
    if outcome.stopped:
        raise JobCancelled(job_id)

    reporter.phase(JobPhase.EVALUATING)
    student.load_state_dict(outcome.state.best_state)
    student_logits = predict_logits(student, test_split.x)
    student_test = logit_metrics(student_logits, test_split.teacher_logits, test_split.y)
    teacher_test = logit_metrics(test_split.teacher_logits, test_split.teacher_logits, test_split.y)
    student_parameters = parameter_count(student)
    teacher_parameters = sum(t.parameter_count for t in teachers)
    # The student has the teacher's outputs, which may be more than the dataset's classes.
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
                "accuracy": accuracy(
                    torch.from_numpy(logits_of["test"]), torch.from_numpy(data.y_test)
                ),
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
        "cpu_threads": torch.get_num_threads(),
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
    reporter.phase(JobPhase.DONE)  # the last cancel check
    finalize(job_id, attempt, artifact_prefix, paths, result)


def finalize(
    job_id: str,
    attempt: int,
    prefix: str,
    paths: dict[ArtifactFormat, Path],
    result: dict[str, Any],
) -> None:
    """Succeed and record the artifacts in one transaction, if this attempt still owns the job."""
    with session_scope() as session:
        done = session.execute(
            update(Job)
            .where(owned(job_id, attempt))
            .values(
                status=JobStatus.SUCCEEDED,
                phase=JobPhase.DONE,
                progress=1.0,
                result=result,
                finished_at=utcnow(),
                heartbeat_at=utcnow(),
            )
        ).rowcount  # type: ignore[attr-defined]
        if not done:
            raise JobSuperseded(job_id)
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
    store = get_store()
    store.delete_tree(f"checkpoints/{job_id}")
    # Exports of earlier attempts (superseded after exporting) belong to nobody now.
    for folder in store.path(f"artifacts/{job_id}").glob("attempt-*"):
        if folder.name != Path(prefix).name:
            store.delete_tree(f"artifacts/{job_id}/{folder.name}")
