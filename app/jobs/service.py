from typing import Any

import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.datasets.arrays import DatasetArrays
from app.datasets.loading import load_builtin, load_uploaded
from app.datasets.service import DatasetSummary, resolve_dataset
from app.datasets.text import TextRecords
from app.datasets.tokenized import shared_tokenizer, tokenize_records
from app.db import lock_rows
from app.errors import Conflict, InvalidSpec, NotFound
from app.jobs import repository
from app.jobs.features import (
    attention_transfer_student,
    resolve_layer_pairs,
    resolve_text_layer_pairs,
)
from app.jobs.methods import FeatureMethod, TextFeatureMethod
from app.jobs.preflight import PreflightReport, PreflightTeacher, run_preflight, settle_scores
from app.jobs.schemas import DistillationSpec, JobOut, check_augmentation
from app.ml.layers import FeatureLayer, activation_bytes
from app.ml.signature import (
    ModelSignature,
    SignatureMismatch,
    check_compatible,
)
from app.ml.students import TransformerSpec, family_of, resolve_student, student_signature
from app.ml.teacher_formats import FORMATS, ScoresChoice
from app.ml.text import is_text
from app.models import TERMINAL_STATUSES, Dataset, Job, JobMetric, JobStatus, Teacher
from app.queue import enqueue_after_commit
from app.quotas import check_queued_jobs, check_storage
from app.storage import ArtifactStore, get_store, keys


def _tensors(signature: ModelSignature) -> tuple[object, ...]:
    return (*((t.datatype, t.shape) for t in signature.inputs), signature.num_classes)


def _choice(teacher: Teacher) -> ScoresChoice:
    if teacher.scores_choice is None:  # uploaded before choices were recorded
        return ScoresChoice(output=teacher.signature["outputs"][0]["name"], by="position")
    return ScoresChoice.model_validate(teacher.scores_choice)


def _layers(teacher: Teacher) -> list[FeatureLayer]:
    return [FeatureLayer.model_validate(layer) for layer in teacher.feature_layers or []]


def _settle(teacher: Teacher, num_classes: int) -> None:
    """Where the upload could not tell which output holds the scores, the dataset's class count
    does: recorded on the teacher before its classes and layers are checked against the job."""
    signature = ModelSignature.model_validate(teacher.signature)
    settled, layers, choice = settle_scores(
        signature, _layers(teacher), _choice(teacher), num_classes
    )
    if choice != _choice(teacher):
        teacher.signature = settled.model_dump(mode="json")
        teacher.feature_layers = [layer.model_dump() for layer in layers]
        teacher.scores_choice = choice.model_dump(mode="json")


def validate_spec(
    session: Session, tenant_id: str, spec: DistillationSpec
) -> tuple[list[Teacher], DatasetSummary]:
    """Everything that can be checked before queueing, so a mistake is a 422, not a failed job;
    returns the job's teachers, in order, and its dataset.

    Defaults that depend on the models (a feature method's layers) are filled into ``spec``.
    """
    field = "teacher" if spec.teachers is None else "teachers"
    teachers = []
    for teacher_id, _ in spec.teacher_weights:
        teacher = session.get(Teacher, teacher_id)
        if teacher is None or teacher.tenant_id != tenant_id:
            raise InvalidSpec(f"No teacher with id {teacher_id}.", field=field)
        teachers.append(teacher)
    dataset = resolve_dataset(session, tenant_id, spec.dataset)
    for teacher in teachers:
        _settle(teacher, dataset.signature.num_classes)
    signature = ModelSignature.model_validate(teachers[0].signature)
    for other in teachers[1:]:
        other_signature = ModelSignature.model_validate(other.signature)
        # Names may differ (each backend feeds its own); the tensors and classes may not.
        if _tensors(other_signature) != _tensors(signature):
            raise InvalidSpec(
                f"An ensemble's teachers must share inputs and classes: {teachers[0].id} takes "
                f"{signature.describe_inputs()} with {signature.num_classes} classes, {other.id} "
                f"{other_signature.describe_inputs()} with {other_signature.num_classes}.",
                field=field,
            )
    try:
        check_compatible(signature, dataset.signature, field="dataset")
    except SignatureMismatch as e:
        raise InvalidSpec(e.detail, field=e.field) from e
    student = student_signature(signature, dataset.signature)
    reason = family_of(spec.student).accepts(student)
    if reason is not None:
        raise InvalidSpec(
            f"A {spec.student.architecture} student cannot take these inputs: {reason}.",
            field="student.architecture",
        )
    check_augmentation(spec, dataset.signature)
    try:  # what the student takes from its teacher's config
        spec.student = resolve_student(spec.student, teachers[0].architecture)
    except ValueError as e:
        raise InvalidSpec(f"The student cannot be built: {e}.", field="student") from e
    # Training keeps every layer's output for the backward pass, and their gradients.
    batch_bytes = 2 * activation_bytes(spec.student, student) * spec.training.batch_size
    budget = get_settings().max_training_activation_bytes
    if batch_bytes > budget:
        raise InvalidSpec(
            f"This student needs about {batch_bytes / 2**30:.1f} GiB of activations and "
            f"gradients for one batch of {spec.training.batch_size}, more than the "
            f"{budget / 2**30:.1f} GiB DISTILL_MAX_TRAINING_ACTIVATION_BYTES allows: use a "
            "smaller `training.batch_size` or a narrower student.",
            field="training.batch_size",
        )
    if isinstance(spec.distillation, FeatureMethod):
        if len(teachers) > 1:
            raise InvalidSpec(
                f"`{spec.distillation.method}` matches the layers of one teacher; an ensemble "
                "has no common layers. Use a logit method (e.g. `kd`) for ensembles.",
                field="teachers",
            )
        text_method = isinstance(spec.distillation, TextFeatureMethod)
        if text_method != is_text(student):
            raise InvalidSpec(
                f"`{spec.distillation.method}` matches "
                + (
                    "transformer layers of text models (`hidden_states`, `attention_kl`)"
                    if text_method
                    else "image and vector layers; text students take `hidden_states` or "
                    "`attention_kl`, or any logit method (e.g. `kd`)"
                )
                + ".",
                field="distillation.method",
            )
        if isinstance(spec.distillation, TextFeatureMethod):
            spec.distillation.layers = resolve_text_layer_pairs(
                spec.distillation, teachers[0], spec.student
            )
            assert isinstance(spec.student, TransformerSpec)  # checked by the line above
            spec.student = attention_transfer_student(spec.distillation, spec.student)
        else:
            spec.distillation.layers = resolve_layer_pairs(
                spec.distillation,
                teachers[0],
                spec.student,
                dataset,
                get_settings().max_teacher_feature_bytes,
            )
    return teachers, dataset


def submission_preflight(
    session: Session, teachers: list[Teacher], dataset: DatasetSummary
) -> PreflightReport | None:
    """The preflight, at submission, when the files are small enough to run it in the request
    (``preflight_max_bytes``); what it settles is written to the teachers. None: too big, the
    worker runs it as the job's first step.

    Raises:
        PreflightFailed: 422, with the cause's own code.
    """
    store = get_store()
    size = sum(t.size_bytes for t in teachers)
    upload = None if dataset.ref.startswith("builtin:") else session.get(Dataset, dataset.ref)
    size += 0 if upload is None else upload.size_bytes
    if size > get_settings().preflight_max_bytes:
        return None
    data = (
        load_builtin(dataset.ref)
        if upload is None
        else load_uploaded(
            store.path(upload.storage_key),
            dataset.signature.scores.classes,
            dataset.signature.preprocessing,
        )
    )
    checked = []
    for teacher in teachers:
        signature = ModelSignature.model_validate(teacher.signature)
        backend = FORMATS[teacher.format].open(
            store.path(teacher.storage_key), signature, teacher.architecture, torch.device("cpu")
        )
        checked.append(PreflightTeacher(teacher.id, backend, _choice(teacher), _layers(teacher)))
    if isinstance(data, TextRecords):
        data = _tokenized(data, checked)
    report = run_preflight(checked, data, stage="submission")
    for teacher, settled in zip(teachers, checked, strict=True):
        teacher.signature = settled.signature.model_dump(mode="json")
        teacher.scores_choice = settled.choice.model_dump(mode="json")
        teacher.feature_layers = [layer.model_dump() for layer in settled.feature_layers]
    return report


def _tokenized(records: TextRecords, teachers: list[PreflightTeacher]) -> DatasetArrays:
    """Text records tokenised with the teachers' tokenizer, for their preflight.

    Raises:
        InvalidSpec: an ensemble's text teachers tokenise differently.
    """
    try:
        tokenizer, preprocessing = shared_tokenizer([t.backend for t in teachers])
    except ValueError as e:
        raise InvalidSpec(str(e), field="teachers") from e
    return tokenize_records(records, tokenizer, preprocessing)[0]


def create_job(session: Session, tenant_id: str, spec: DistillationSpec) -> Job:
    """Validate, preflight and queue a job. Its teachers and uploaded dataset are locked first
    (``lock_rows``), so one deleted meanwhile is a 422 here, and one not yet deleted keeps its row
    and files until the job is committed (its deletion then sees the job: a 409).

    Raises:
        QuotaExceeded: 429, the tenant has ``DISTILL_QUOTA_QUEUED_JOBS`` jobs queued.
        InsufficientStorage: 507, the tenant stores its ``DISTILL_QUOTA_STORAGE_BYTES``.
        InvalidSpec, PreflightFailed: 422.
    """
    settings = get_settings()
    check_storage(session, get_store(), tenant_id, 0, settings)
    teacher_ids = [teacher_id for teacher_id, _ in spec.teacher_weights]
    lock_rows(session, Teacher, teacher_ids, exclusive=False)
    lock_rows(session, Dataset, [spec.dataset], exclusive=False)
    teachers, dataset = validate_spec(session, tenant_id, spec)
    report = submission_preflight(session, teachers, dataset)
    check_queued_jobs(session, tenant_id, settings)
    job = repository.add_job(
        session,
        tenant_id=tenant_id,
        spec=spec.model_dump(mode="json", exclude_none=True),
        dataset_ref=spec.dataset,
        teacher_ids=teacher_ids,
    )
    job.preflight = None if report is None else report.model_dump(mode="json")
    enqueue_after_commit(session, job.id)
    return job


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """The tenant's job. Raises NotFound, also for another tenant's."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"No job with id {job_id}.")
    return job


def delete_job(session: Session, tenant_id: str, store: ArtifactStore, job_id: str) -> Job:
    """Delete a finished job with its metrics and artifacts (and any checkpoint left), the files
    once the deletion commits; returns the deleted row.

    Raises:
        NotFound: the tenant has no such job.
        Conflict: 409 ``job_not_finished``, a job queued or running (cancel it first).
    """
    job = get_job(session, tenant_id, job_id)
    if job.status not in TERMINAL_STATUSES:
        raise Conflict(
            f"Job {job_id} is {job.status}: cancel it, then delete it once it has stopped.",
            code="job_not_finished",
            job_status=job.status,
        )
    session.delete(job)  # its metrics, artifacts and teacher memberships go with it (cascade)
    session.flush()
    store.delete_after_commit(session, keys.artifacts(job_id), keys.checkpoints(job_id))
    return job


def latest_metrics(session: Session, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The last epoch's metrics of each job, in one query (a page of jobs costs no more)."""
    last_epoch = (
        select(JobMetric.job_id, func.max(JobMetric.epoch).label("epoch"))
        .where(JobMetric.job_id.in_(job_ids))
        .group_by(JobMetric.job_id)
        .subquery()
    )
    rows = session.scalars(
        select(JobMetric).join(
            last_epoch,
            (JobMetric.job_id == last_epoch.c.job_id) & (JobMetric.epoch == last_epoch.c.epoch),
        )
    )
    return {row.job_id: {"epoch": row.epoch, **row.values} for row in rows}


def jobs_out(session: Session, jobs: list[Job]) -> list[JobOut]:
    metrics = latest_metrics(session, [job.id for job in jobs])
    return [_job_out(job, metrics.get(job.id)) for job in jobs]


def job_out(session: Session, job: Job) -> JobOut:
    return jobs_out(session, [job])[0]


def _job_out(job: Job, metrics: dict[str, Any] | None) -> JobOut:
    return JobOut(
        id=job.id,
        status=job.status,
        phase=job.phase,
        progress=job.progress,
        attempt=job.attempt,
        spec=job.spec,
        teacher_id=job.teacher_id,
        dataset=job.dataset_ref,
        alias=job.alias,
        created_at=job.created_at,
        started_at=job.started_at,
        heartbeat_at=job.heartbeat_at,
        finished_at=job.finished_at,
        artifacts_removed_at=job.artifacts_removed_at,
        phase_seconds=job.phase_seconds,
        latest_metrics=metrics,
        result=job.result,
        error=job.error,
        preflight=job.preflight,
    )


def list_jobs(
    session: Session, tenant_id: str, *, limit: int, offset: int, status: JobStatus | None
) -> tuple[list[Job], int]:
    """A page of the tenant's jobs, newest first, and how many there are."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    jobs = session.scalars(
        query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    )
    return list(jobs), total


def list_metrics(session: Session, tenant_id: str, job_id: str) -> list[JobMetric]:
    get_job(session, tenant_id, job_id)
    return list(
        session.scalars(
            select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.epoch)
        )
    )


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop at its next check."""
    job = get_job(session, tenant_id, job_id)
    changed = repository.request_cancel(session, job_id)
    if not changed:
        raise Conflict(f"Job {job_id} has already finished ({job.status}).", job_status=job.status)
    session.refresh(job)
    return job
