"""The job spec users send, stored on the job row and validated again by the worker."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.ml.architectures import ModelSpec


class KnowledgeDistillation(BaseModel):
    """Hinton et al. 2015: ``alpha`` weights the soft-target term, ``1 - alpha`` the label term."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["kd"] = "kd"
    temperature: float = Field(default=4.0, gt=0.0, le=100.0)
    alpha: float = Field(default=0.9, ge=0.0, le=1.0)


class Training(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=5, ge=1, le=1000)
    batch_size: int = Field(default=128, ge=1, le=65_536)
    learning_rate: float = Field(default=1e-3, gt=0.0, le=10.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class DistillationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str = Field(description="Id of an uploaded teacher.", max_length=64)
    dataset: str = Field(
        description="`builtin:fashion-mnist`, `builtin:digits`, or an uploaded dataset id.",
        max_length=64,
    )
    student: ModelSpec
    distillation: KnowledgeDistillation = KnowledgeDistillation()
    training: Training = Training()


class JobOut(BaseModel):
    id: str
    status: str
    phase: str
    progress: float
    attempt: int
    spec: dict[str, Any]
    teacher_id: str | None
    dataset: str
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    latest_metrics: dict[str, Any] | None = None
    result: dict[str, Any] | None
    error: dict[str, Any] | None


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class MetricOut(BaseModel):
    epoch: int
    values: dict[str, Any]
    created_at: datetime


class MetricList(BaseModel):
    items: list[MetricOut]


class Problem(BaseModel):
    """RFC 9457 problem details, as every error is answered."""

    type: str
    title: str
    status: int
    detail: str
    code: str
