"""The job spec users send, stored on the job row and validated again by the worker."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.ml.architectures import ModelSpec

Temperature = Annotated[float, Field(gt=0.0, le=100.0, description="Softmax temperature T.")]
Alpha = Annotated[
    float,
    Field(
        ge=0.0,
        le=1.0,
        description="Weight of the teacher term; `1 - alpha` weights cross-entropy on the labels.",
    ),
]
Weight = Annotated[float, Field(ge=0.0, le=1000.0)]


class _Method(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KnowledgeDistillation(_Method):
    """Hinton et al. 2015: `alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE`."""

    method: Literal["kd"] = "kd"
    temperature: Temperature = 4.0
    alpha: Alpha = 0.9


class LogitMSE(_Method):
    """Ba & Caruana 2014: `alpha * mean((s - t)^2) + (1 - alpha) * CE`."""

    method: Literal["mse"]
    alpha: Alpha = 0.9


class DecoupledKD(_Method):
    """Zhao et al. CVPR 2022: `CE + tckd_weight * TCKD + nckd_weight * NCKD` (the paper's alpha
    is `tckd_weight`, its beta `nckd_weight`)."""

    method: Literal["dkd"]
    temperature: Temperature = 4.0
    tckd_weight: Weight = 1.0
    nckd_weight: Weight = 8.0


class DIST(_Method):
    """Huang et al. NeurIPS 2022: `CE + T^2 * (inter_weight * inter + intra_weight * intra)`,
    with 1 - Pearson correlation between class-probability rows (inter) and columns (intra)."""

    method: Literal["dist"]
    temperature: Temperature = 1.0
    inter_weight: Weight = 1.0
    intra_weight: Weight = 1.0


class StandardizedKD(_Method):
    """Sun et al. CVPR 2024: Hinton KD on per-sample Z-scored logits."""

    method: Literal["ls_kd"]
    temperature: Temperature = 2.0
    alpha: Alpha = 0.9


class ForwardKL(_Method):
    """Token-level `KL(p_t || p_s)` (mean-seeking), averaged over positions."""

    method: Literal["forward_kl"]
    temperature: Temperature = 1.0
    alpha: Alpha = 1.0


class ReverseKL(_Method):
    """Token-level `KL(p_s || p_t)` (mode-seeking; MiniLLM), averaged over positions."""

    method: Literal["reverse_kl"]
    temperature: Temperature = 1.0
    alpha: Alpha = 1.0


class GeneralizedJSD(_Method):
    """Agarwal et al. ICLR 2024 (GKD): `beta KL(p_t || m) + (1 - beta) KL(p_s || m)`,
    `m = beta p_t + (1 - beta) p_s`."""

    method: Literal["jsd"]
    temperature: Temperature = 1.0
    beta: float = Field(default=0.5, gt=0.0, lt=1.0)
    alpha: Alpha = 1.0


class LayerPair(BaseModel):
    """One hooked layer of each model whose outputs a feature method matches."""

    model_config = ConfigDict(extra="forbid")
    teacher: str = Field(
        min_length=1,
        max_length=255,
        description="A name from the teacher's `feature_layers` (a module path, or for an ONNX "
        "teacher the name of an extra graph output).",
    )
    student: str = Field(
        min_length=1,
        max_length=255,
        description="A module path in the student architecture, e.g. `7` for the output of a "
        "`cnn` student's second block (a 422 lists them all).",
    )


FeatureWeight = Annotated[float, Field(ge=0.0, le=1e6)]


class _FeatureMethod(_Method):
    """Cross-entropy (or Hinton KD, with `alpha` > 0) plus a term matching hooked layers."""

    layers: list[LayerPair] | None = Field(
        default=None,
        min_length=1,
        max_length=4,
        description="Defaults to the last feature map `[C, H, W]` of each model (FitNets, AT), "
        "or each model's input to its classifier (SP, RKD); stored resolved on the job.",
    )
    temperature: Temperature = 4.0
    alpha: Alpha = Field(
        default=0.0,
        description="Weight of a Hinton KD term on the logits; `1 - alpha` weights cross-entropy. "
        "0 (the default) is the papers' setting: cross-entropy plus the feature term.",
    )


class FitNets(_FeatureMethod):
    """Romero et al. ICLR 2015: `weight * mean((r(f_s) - f_t)^2)` with a learned 1x1-conv (or
    linear) regressor `r`, summed over layer pairs."""

    method: Literal["fitnets"]
    weight: FeatureWeight = 1.0


class AttentionTransfer(_FeatureMethod):
    """Zagoruyko & Komodakis ICLR 2017: `weight / 2 * mean((a_s - a_t)^2)` between L2-normalised
    spatial attention maps `a = normalize(mean_c(f^2))`, summed over pairs of equal H x W."""

    method: Literal["at"]
    weight: FeatureWeight = 1000.0


class SimilarityPreserving(_FeatureMethod):
    """Tung & Mori ICCV 2019: `weight * ||G_s - G_t||_F^2 / B^2` between the row-normalised
    batch similarity matrices `G = normalize(F F^T)`."""

    method: Literal["sp"]
    weight: FeatureWeight = 3000.0


class RelationalKD(_FeatureMethod):
    """Park et al. CVPR 2019: Huber losses between the batch's normalised pairwise distances
    (`distance_weight`) and triplet angles (`angle_weight`) of student and teacher embeddings."""

    method: Literal["rkd"]
    distance_weight: FeatureWeight = 25.0
    angle_weight: FeatureWeight = 50.0


FeatureMethod = FitNets | AttentionTransfer | SimilarityPreserving | RelationalKD
DistillationMethod = Annotated[
    KnowledgeDistillation
    | LogitMSE
    | DecoupledKD
    | DIST
    | StandardizedKD
    | ForwardKL
    | ReverseKL
    | GeneralizedJSD
    | FitNets
    | AttentionTransfer
    | SimilarityPreserving
    | RelationalKD,
    Field(discriminator="method"),
]


class Training(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=64)
    weight: float = Field(default=1.0, gt=0.0, le=1000.0)


class DistillationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
    student: ModelSpec
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
