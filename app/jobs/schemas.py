"""The job spec users send, stored on the job row and validated again by the worker."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.errors import InvalidSpec
from app.jobs.methods import DistillationMethod, FeatureMethod, KnowledgeDistillation
from app.jobs.preflight import Finding, PreflightReport
from app.ml.signature import ImagePreprocessing, ModelSignature
from app.ml.students import StudentSpec
from app.ml.students.base import one_float_tensor


def _interval(value: tuple[float, float], name: str) -> tuple[float, float]:
    low, high = value
    if low > high:
        raise ValueError(f"{name} is [min, max]: min {low} is above max {high}")
    return value


class RandomResizedCrop(BaseModel):
    """A random box of ``scale`` of the image's area and aspect ratio (width / height) in
    ``ratio`` (log-uniform), resized back to the input size (bilinear), as torchvision's
    ``RandomResizedCrop`` (Szegedy et al. 2015)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    scale: tuple[
        Annotated[float, Field(gt=0.0, le=1.0)], Annotated[float, Field(gt=0.0, le=1.0)]
    ] = Field(default=(0.5, 1.0), description="[min, max] fraction of the image's area.")
    ratio: tuple[
        Annotated[float, Field(gt=0.0, le=10.0)], Annotated[float, Field(gt=0.0, le=10.0)]
    ] = Field(default=(3 / 4, 4 / 3), description="[min, max] aspect ratio (width / height).")

    @field_validator("scale")
    @classmethod
    def _scale_ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _interval(value, "scale")

    @field_validator("ratio")
    @classmethod
    def _ratio_ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _interval(value, "ratio")


class ColorJitter(BaseModel):
    """Brightness, contrast and saturation factors drawn per image uniformly from
    ``[1 - x, 1 + x]``, as torchvision's ``ColorJitter`` (0: unchanged)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    brightness: float = Field(default=0.0, ge=0.0, le=1.0)
    contrast: float = Field(default=0.0, ge=0.0, le=1.0)
    saturation: float = Field(default=0.0, ge=0.0, le=1.0, description="RGB images only.")


class Mixup(BaseModel):
    """Zhang et al. 2018: ``lam * x + (1 - lam) * x[perm]``, ``lam ~ Beta(alpha, alpha)``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    alpha: float = Field(default=0.2, gt=0.0, le=100.0)


class CutMix(BaseModel):
    """Yun et al. 2019: a box of ``x[perm]`` pasted over ``x``, of area ``1 - lam`` of the image,
    ``lam ~ Beta(alpha, alpha)``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    alpha: float = Field(default=1.0, gt=0.0, le=100.0)


class Augmentation(BaseModel):
    """Training augmentation of image inputs ``[C, H, W]``, in this order: crop, flip, colour
    jitter, then mixup or cutmix across the batch. The teacher then runs on every augmented
    batch (online) instead of its outputs being computed once."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    random_resized_crop: RandomResizedCrop | None = None
    horizontal_flip: bool = Field(default=False, description="Mirror half the images (p = 0.5).")
    color_jitter: ColorJitter | None = None
    mixup: Mixup | None = None
    cutmix: CutMix | None = None

    @model_validator(mode="after")
    def _one_mix_and_something_to_do(self) -> "Augmentation":
        if self.mixup is not None and self.cutmix is not None:
            raise ValueError("give `mixup` or `cutmix`, not both")
        if not (
            self.random_resized_crop
            or self.horizontal_flip
            or self.color_jitter
            or self.mixup
            or self.cutmix
        ):
            raise ValueError(
                "names no augmentation: set `random_resized_crop`, `horizontal_flip`, "
                "`color_jitter`, `mixup` or `cutmix` (or leave `augmentation` out)"
            )
        return self


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
    augmentation: Augmentation | None = Field(
        default=None,
        description="Augment image training batches; the teacher then runs on every augmented "
        "batch (`result.teacher_outputs` `online`), which costs a teacher pass per step.",
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


def check_augmentation(spec: DistillationSpec, data: ModelSignature) -> None:
    """Refuse augmentation the dataset or the method cannot take (at submission).

    Raises:
        InvalidSpec: on ``training.augmentation``: inputs that are not images ``[C, H, W]``,
            colour jitter on images that are neither grey nor RGB (saturation: RGB only), or a
            feature method (its teacher layers are computed once, on the stored images).
    """
    augmentation = spec.training.augmentation
    if augmentation is None:
        return
    field = "training.augmentation"
    reason = one_float_tensor(data, rank=3)
    if reason is not None:
        raise InvalidSpec(
            f"Augmentation is for image inputs [C, H, W]; this dataset's {reason}. "
            "Leave `training.augmentation` out for flat vectors and text.",
            field=field,
        )
    channels = data.inputs[0].shape[0]
    jitter = augmentation.color_jitter
    grey = channels == 1 or (
        isinstance(data.preprocessing, ImagePreprocessing)
        and data.preprocessing.channel_order == "L"
    )
    if jitter is not None and channels not in (1, 3):
        raise InvalidSpec(
            f"`color_jitter` takes grey or RGB images; these have {channels} channels.",
            field=f"{field}.color_jitter",
        )
    if jitter is not None and jitter.saturation > 0 and grey:
        raise InvalidSpec(
            "`color_jitter.saturation` changes colour images only; these images are grey. "
            "Use `brightness` and `contrast`.",
            field=f"{field}.color_jitter.saturation",
        )
    if isinstance(spec.distillation, FeatureMethod):
        raise InvalidSpec(
            f"`{spec.distillation.method}` matches teacher layers computed once on the stored "
            "images; with augmentation they would describe other images. Use a logit method "
            "(e.g. `kd`) with augmentation, or leave `training.augmentation` out.",
            field=field,
        )


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
    teacher_outputs: Literal["cached", "online"] | None = Field(
        default=None,
        description="How training got the teacher's outputs: `cached` (computed once on the "
        "stored training inputs) or `online` (the teacher ran on every augmented training "
        "batch, one pass per step). Validation and test figures always use the once-computed "
        "outputs on the stored inputs.",
    )
    online_teacher_seconds: float | None = Field(
        default=None,
        description="With `online` teacher outputs: the seconds training spent in teacher passes.",
    )
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
