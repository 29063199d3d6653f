"""All tables. Statuses are StrEnums stored as plain strings so clients can meet new ones."""

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    String,
    TypeDecorator,
    UniqueConstraint,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime,
        dict[str, Any]: JSON,
        list[int]: JSON,
        list[dict[str, Any]]: JSON,
    }


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class JobPhase(StrEnum):
    QUEUED = "queued"
    VALIDATING = "validating"
    TEACHER_OUTPUTS = "teacher_outputs"
    TRAINING = "training"
    EVALUATING = "evaluating"
    EXPORTING = "exporting"
    DONE = "done"


class ArtifactFormat(StrEnum):
    MANIFEST = "manifest"
    SAFETENSORS = "safetensors"
    ONNX = "onnx"
    ONNX_INT8 = "onnx_int8"  # the student quantised to int8 (onnxruntime), served as version int8
    TOKENIZER = "tokenizer"  # a text student's tokenizer.json (its teacher's)


# Every row of a tenant's belongs to one; with authentication off, everything is this one's.
DEFAULT_TENANT_ID = "default"


class KeyRole(StrEnum):
    ADMIN = "admin"  # also reads the deployment's /metrics
    MEMBER = "member"


class Tenant(Base):
    """A team: what its keys may see. Rows of another tenant's are answered as absent."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When a worker last took one of its jobs: among tenants with as many running jobs, the
    # next free worker serves the one served longest ago (round-robin, ``repository.claim_next``).
    dispatched_at: Mapped[datetime | None]


class ApiKey(Base):
    """An API key: found by its public ``prefix``, checked against its Argon2id ``hash`` (the
    key itself is never stored)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


def tenant_column() -> Mapped[str]:
    return mapped_column(ForeignKey("tenants.id"), index=True)


class Teacher(Base):
    __tablename__ = "teachers"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = tenant_column()
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    parameter_count: Mapped[int] = mapped_column(BigInteger)
    # app.ml.signature.ModelSignature as JSON: named inputs, class scores, preprocessing.
    signature: Mapped[dict[str, Any]]
    # What the format needs besides the file to open it (a safetensors teacher's config).
    architecture: Mapped[dict[str, Any] | None]
    # What feature methods can hook: [{"name", "shape", "kind"}] (see app.ml.layers).
    feature_layers: Mapped[list[dict[str, Any]] | None]
    # How the class scores were chosen among the outputs and how their kind is known
    # (app.ml.teacher_formats.base.ScoresChoice); null for teachers uploaded before it existed.
    scores_choice: Mapped[dict[str, Any] | None]
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = tenant_column()
    name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    signature: Mapped[dict[str, Any]]
    train_size: Mapped[int]
    test_size: Mapped[int]
    has_test_split: Mapped[bool]
    labelled: Mapped[bool] = mapped_column(default=True, server_default=true())
    # The stored inputs' dtype and value range (app.datasets.arrays.InputStats); null for uploads
    # from before it was recorded.
    input_stats: Mapped[dict[str, Any] | None]
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "alias", name="uq_jobs_tenant_alias"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = tenant_column()
    status: Mapped[str] = mapped_column(String(32), default=JobStatus.QUEUED, index=True)
    phase: Mapped[str] = mapped_column(String(32), default=JobPhase.QUEUED)
    progress: Mapped[float] = mapped_column(default=0.0)
    spec: Mapped[dict[str, Any]]
    teacher_id: Mapped[str | None] = mapped_column(
        ForeignKey("teachers.id", ondelete="SET NULL"), index=True
    )
    dataset_ref: Mapped[str] = mapped_column(String(64))
    # A name the user gives a succeeded job's student, to serve it by (Open Inference Protocol
    # model name); unique within the tenant.
    alias: Mapped[str | None] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    result: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    # What the preflight found (app.jobs.preflight.PreflightReport), warnings included.
    preflight: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # When it was last queued (submitted, or requeued after its worker died): the age of the
    # queue in /metrics.
    enqueued_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Set when DISTILL_ARTIFACT_RETENTION_DAYS removed its student's files (worker.retention).
    artifacts_removed_at: Mapped[datetime | None]
    # Seconds spent in each phase of its last attempt, {"training": 41.2, ...}, as they end.
    phase_seconds: Mapped[dict[str, Any] | None]


class JobTeacher(Base):
    """A job's teachers (one, or an ensemble's members), in the order of its spec, which holds
    their weights."""

    __tablename__ = "job_teachers"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(primary_key=True)
    teacher_id: Mapped[str] = mapped_column(
        ForeignKey("teachers.id", ondelete="CASCADE"), index=True
    )


class JobMetric(Base):
    """One row per epoch: losses and evaluation figures, as a JSON object of floats."""

    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "epoch"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int]
    values: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "format"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    format: Mapped[str] = mapped_column(String(32))
    storage_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotentRequest(Base):
    """A request made with an ``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header):
    its fingerprint, then its response once it has one; ``status_code`` is null while the first
    request is still being answered."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("tenant_id", "key", name="uq_idempotency_tenant_key"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    # "POST /v1/jobs": a key names one request to one resource.
    target: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None]
    response: Mapped[dict[str, Any] | None]
    # The response headers replayed with it (Location).
    headers: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
