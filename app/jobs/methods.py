"""The distillation methods a job spec names: one config class per method, discriminated by its
``method`` field. Each class declares its ``kind``; the worker maps each class to its loss."""

from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

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
FeatureWeight = Annotated[float, Field(ge=0.0, le=1e6)]


class MethodKind(StrEnum):
    """What a method compares: class logits, per-token distributions, or hooked layers."""

    LOGIT = "logit"
    SEQUENCE = "sequence"
    FEATURE = "feature"


class MethodConfig(BaseModel):
    """One method's parameters."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: ClassVar[MethodKind]

    @property
    def teacher_temperature(self) -> float:
        """The temperature an ensemble of teachers is mixed at: 1 for a method without one."""
        return 1.0


class _Softened(MethodConfig):
    """A method comparing distributions softened at its temperature T; ensembles mix at T too."""

    if TYPE_CHECKING:  # a field of each subclass, declared there to keep the JSON field order
        temperature: float

    @property
    def teacher_temperature(self) -> float:
        """The method's temperature T."""
        return self.temperature


class KnowledgeDistillation(_Softened):
    """Hinton et al. 2015: `alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE`."""

    kind: ClassVar[MethodKind] = MethodKind.LOGIT
    method: Literal["kd"] = "kd"
    temperature: Temperature = 4.0
    alpha: Alpha = 0.9


class LogitMSE(MethodConfig):
    """Ba & Caruana 2014: `alpha * mean((s - t)^2) + (1 - alpha) * CE`."""

    kind: ClassVar[MethodKind] = MethodKind.LOGIT
    method: Literal["mse"]
    alpha: Alpha = 0.9


class DecoupledKD(_Softened):
    """Zhao et al. CVPR 2022: `CE + tckd_weight * TCKD + nckd_weight * NCKD` (the paper's alpha
    is `tckd_weight`, its beta `nckd_weight`)."""

    kind: ClassVar[MethodKind] = MethodKind.LOGIT
    method: Literal["dkd"]
    temperature: Temperature = 4.0
    tckd_weight: Weight = 1.0
    nckd_weight: Weight = 8.0


class DIST(_Softened):
    """Huang et al. NeurIPS 2022: `CE + T^2 * (inter_weight * inter + intra_weight * intra)`,
    with 1 - Pearson correlation between class-probability rows (inter) and columns (intra)."""

    kind: ClassVar[MethodKind] = MethodKind.LOGIT
    method: Literal["dist"]
    temperature: Temperature = 1.0
    inter_weight: Weight = 1.0
    intra_weight: Weight = 1.0


class StandardizedKD(_Softened):
    """Sun et al. CVPR 2024: Hinton KD on per-sample Z-scored logits."""

    kind: ClassVar[MethodKind] = MethodKind.LOGIT
    method: Literal["ls_kd"]
    temperature: Temperature = 2.0
    alpha: Alpha = 0.9


class ForwardKL(_Softened):
    """Token-level `KL(p_t || p_s)` (mean-seeking), averaged over positions."""

    kind: ClassVar[MethodKind] = MethodKind.SEQUENCE
    method: Literal["forward_kl"]
    temperature: Temperature = 1.0
    alpha: Alpha = 1.0


class ReverseKL(_Softened):
    """Token-level `KL(p_s || p_t)` (mode-seeking; MiniLLM), averaged over positions."""

    kind: ClassVar[MethodKind] = MethodKind.SEQUENCE
    method: Literal["reverse_kl"]
    temperature: Temperature = 1.0
    alpha: Alpha = 1.0


class GeneralizedJSD(_Softened):
    """Agarwal et al. ICLR 2024 (GKD): `beta KL(p_t || m) + (1 - beta) KL(p_s || m)`,
    `m = beta p_t + (1 - beta) p_s`."""

    kind: ClassVar[MethodKind] = MethodKind.SEQUENCE
    method: Literal["jsd"]
    temperature: Temperature = 1.0
    beta: float = Field(default=0.5, gt=0.0, lt=1.0)
    alpha: Alpha = 1.0


class LayerPair(BaseModel):
    """One hooked layer of each model whose outputs a feature method matches."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
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


class _FeatureMethod(_Softened):
    """Cross-entropy (or Hinton KD, with `alpha` > 0) plus a term matching hooked layers."""

    kind: ClassVar[MethodKind] = MethodKind.FEATURE
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


class _TextFeatureMethod(_Softened):
    """Hinton KD on the logits (``alpha``; ``1 - alpha`` weights cross-entropy) plus a term
    matching transformer layers of the two models over each record's real tokens. The teacher
    runs beside the student on every batch (its per-token outputs are too large to keep)."""

    kind: ClassVar[MethodKind] = MethodKind.FEATURE
    layers: list[LayerPair] | None = Field(
        default=None,
        min_length=1,
        max_length=25,
        description="Pairs of `hidden_states.<i>` (0: the embeddings) or `attentions.<i>` "
        "(layer i's attention) names; defaults are stored resolved on the job.",
    )
    temperature: Temperature = 4.0
    alpha: Alpha = 0.9


class HiddenStates(_TextFeatureMethod):
    """TinyBERT's hidden-state distillation (Jiao et al., Findings of EMNLP 2020):
    `weight * sum_j mean_{real tokens, d} (H_s W_j - H_t)^2` with a learned linear map `W_j`
    (student width to teacher width) per pair. Default pairs: TinyBERT's uniform mapping,
    student layer m to teacher layer m * T / S, the embeddings (0) included."""

    method: Literal["hidden_states"]
    weight: FeatureWeight = 1.0


class AttentionKL(_TextFeatureMethod):
    """MiniLM's self-attention distribution transfer (Wang et al., NeurIPS 2020):
    `weight * sum_j mean_{heads, real queries} KL(A_t || A_s)` between the attention
    distributions over the keys, per head (student and teacher need as many heads). Default
    pair: the last layer of each."""

    method: Literal["attention_kl"]
    weight: FeatureWeight = 1.0


TextFeatureMethod = HiddenStates | AttentionKL
FeatureMethod = (
    FitNets | AttentionTransfer | SimilarityPreserving | RelationalKD | HiddenStates | AttentionKL
)
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
    | RelationalKD
    | HiddenStates
    | AttentionKL,
    Field(discriminator="method"),
]
