"""The job spec users send, stored on the job row and validated again by the worker."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.jobs.methods import DistillationMethod, KnowledgeDistillation
from app.jobs.preflight import Finding, PreflightReport
from app.ml.students import StudentSpec


class Training(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    epochs: int = Field(default=5, ge=1, le=1000)
    batch_size: int = Field(default=128, ge=1, le=65_536)
    learning_rate: float = Field(default=1e-3, gt=0.0, le=10.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD only.")
    schedule: Literal["constant", "cosine", "step"] = Field(
        default="constant",
        description="`cosine` decays to zero over the run; `step` multiplies by `step_gamma` "
        "every `step_epochs`.",
    )
    step_epochs: int = Field(default=30, ge=1, le=1000)
    step_gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    grad_clip_norm: float | None = Field(default=None, gt=0.0)
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="Stop after this many epochs without a better val accuracy."
    )
    compile: bool = Field(
        default=False,
        description="Train through `torch.compile(student)`: fused kernels, mainly for large "
        "students on CUDA; the first epoch pays for the compilation.",
    )


class WeightedTeacher(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    id: str = Field(max_length=64)
    weight: float = Field(default=1.0, gt=0.0, le=1000.0)


class DistillationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    teacher: str | None = Field(
        default=None, description="Id of an uploaded teacher.", max_length=64
    )
    teachers: list[WeightedTeacher] | None = Field(
        default=None,
        min_length=2,
        max_length=8,
        description="Instead of `teacher`: an ensemble whose softened distributions are averaged "
        "with these weights (normalised to sum to 1).",
    )
    dataset: str = Field(
        description="`builtin:fashion-mnist`, `builtin:digits`, or an uploaded dataset id.",
        max_length=64,
    )
    student: StudentSpec
    distillation: DistillationMethod = KnowledgeDistillation()
    training: Training = Training()

    @model_validator(mode="after")
    def _one_way_to_name_teachers(self) -> "DistillationSpec":
        if (self.teacher is None) == (self.teachers is None):
            raise ValueError("give `teacher` (one id) or `teachers` (an ensemble), exactly one")
        return self

    @property
    def teacher_weights(self) -> list[tuple[str, float]]:
        """(teacher id, weight) pairs, weights summing to 1."""
        if self.teachers is None:
            assert self.teacher is not None
            return [(self.teacher, 1.0)]
        total = sum(t.weight for t in self.teachers)
        return [(t.id, t.weight / total) for t in self.teachers]


class TeacherScore(BaseModel):
    id: str
    weight: float = Field(description="Normalised ensemble weight (1 for a single teacher).")
    accuracy: float = Field(description="This teacher's own test accuracy.")


class JobResult(BaseModel):
    """What a succeeded job measured: the served student and its teacher(s) on the test split.

    Accuracies are fractions in [0, 1]; `kl_to_teacher` is in nats at temperature 1; ECE uses
    15 equal-width confidence bins (Guo et al. 2017); latencies are median single-sample
    milliseconds on onnxruntime with one CPU thread, for student and teacher alike. Figures that
    jobs of earlier versions did not measure are null (or empty) for them.
    """

    student_accuracy: float
    teacher_accuracy: float
    accuracy_retained: float | None = Field(description="Percent of the teacher's accuracy.")
    agreement: float = Field(description="Fraction of samples where student and teacher agree.")
    kl_to_teacher: float | None = None
    student_ece: float | None = None
    teacher_ece: float | None = None
    student_per_class_accuracy: list[float | None] = []
    teacher_per_class_accuracy: list[float | None] = []
    student_parameters: int
    teacher_parameters: int
    compression_ratio: float = Field(description="Teacher parameters / student parameters.")
    teachers: list[TeacherScore] = []
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int | None = None
    early_stopped: bool = False
    resumed_from_epoch: int | None = None
    teacher_outputs_cached: bool = False
    teacher_fixed_batch: int | None = Field(
        default=None,
        description="The batch size a teacher's graph fixes: it ran that many samples at a time, "
        "and its latency is that of one such batch.",
    )
    label_free: bool = False
    train_samples: int
    val_samples: int
    test_samples: int
    device: str
    cpu_threads: int | None = None
    student_size_bytes: int | None = Field(default=None, description="The ONNX student's size.")
    teacher_size_bytes: int | None = None
    student_latency_ms: float | None = None
    teacher_latency_ms: float | None = None
    speedup: float | None = Field(default=None, description="Teacher latency / student latency.")
    wall_seconds: float | None = None
    int8_method: Literal["dynamic", "static"] | None = Field(
        default=None,
        description="How the int8 student (artifact format `onnx_int8`) was quantised with "
        "onnxruntime: `dynamic` (weights int8, activations scaled at run time; MLPs) or `static` "
        "(activation ranges calibrated on validation samples, QDQ format; convnets). The int8 "
        "figures are null when quantisation was skipped or failed (see `warnings`, "
        "`int8_skipped`).",
    )
    int8_accuracy: float | None = Field(
        default=None, description="The int8 student's accuracy (onnxruntime, test split)."
    )
    int8_agreement: float | None = Field(
        default=None,
        description="Fraction of test samples where the int8 and float32 students agree.",
    )
    int8_latency_ms: float | None = Field(
        default=None, description="The int8 student's latency, measured as `student_latency_ms`."
    )
    int8_size_bytes: int | None = Field(default=None, description="The int8 ONNX student's size.")
    int8_speedup: float | None = Field(
        default=None, description="Float32 student latency / int8 student latency."
    )
    latency_tokens: int | None = Field(
        default=None,
        description="Text models: the record length, in tokens, the latencies are measured at.",
    )
    student_latency_batch32_ms: float | None = Field(
        default=None,
        description="Text models: the student's median latency for a batch of 32 records.",
    )
    teacher_latency_batch32_ms: float | None = Field(
        default=None,
        description="Text models: the teacher's median latency for a batch of 32 records.",
    )
    student_init: str | None = Field(
        default=None,
        description="Text students: how the student was initialised (`random`, or which teacher "
        "weights it started from).",
    )
    truncated_records: int | None = Field(
        default=None,
        description="Text: records (train and test) cut to the tokenizer's `max_length`.",
    )
    warnings: list[Finding] = Field(
        default=[],
        description="What the figures suggest doing differently (e.g. `still_improving`: the best "
        "epoch was the last, more epochs would likely help; `texts_truncated`).",
    )


class JobOut(BaseModel):
    id: str
    status: str
    phase: str
    progress: float
    attempt: int
    spec: dict[str, Any]
    teacher_id: str | None
    dataset: str
    alias: str | None = Field(
        default=None, description="The name its student is served by (`/v2/models/{alias}`)."
    )
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    artifacts_removed_at: datetime | None = Field(
        default=None,
        description="When DISTILL_ARTIFACT_RETENTION_DAYS removed its student's files (then "
        "downloading or serving it is a 410 `artifacts_expired`).",
    )
    phase_seconds: dict[str, float] | None = Field(
        default=None,
        description="Seconds its last attempt spent in each phase that has ended "
        '(`{"validating": 0.4, "teacher_outputs": 3.1, "training": 41.2, ...}`).',
    )
    latest_metrics: dict[str, Any] | None = None
    result: JobResult | None
    error: dict[str, Any] | None
    preflight: PreflightReport | None = Field(
        default=None,
        description="What the preflight found before training (at submission when the files "
        "are small, else as the job's first step), warnings included; null until it ran.",
    )


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
