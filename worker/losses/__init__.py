"""Distillation losses, keyed by the config class of the method a job spec names.

``build_loss(config)`` returns the method's loss module. Logit and sequence methods (``LOSSES``)
are called as ``loss(student_logits, teacher_logits, labels) -> (total, terms)``. Feature methods
(``FEATURE_LOSSES``) are built for the per-sample shapes of their (student, teacher) layer pairs
and are called with the two models' hooked outputs as well (see ``FeatureKD``).
"""

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from app.jobs.methods import (
    DIST,
    AttentionKL,
    AttentionTransfer,
    DecoupledKD,
    FitNets,
    ForwardKL,
    GeneralizedJSD,
    HiddenStates,
    KnowledgeDistillation,
    LogitMSE,
    MethodConfig,
    MethodKind,
    RelationalKD,
    ReverseKL,
    SimilarityPreserving,
    StandardizedKD,
)
from worker.losses.common import upcast
from worker.losses.features import (
    AttentionTransferLoss,
    FeatureKD,
    FitNetsLoss,
    RKDLoss,
    Shape,
    SimilarityPreservingLoss,
)
from worker.losses.kd import KDLoss
from worker.losses.logit import DISTLoss, DKDLoss, LogitMSELoss, StandardizedKDLoss
from worker.losses.text_features import AttentionKLLoss, HiddenStateLoss
from worker.losses.token import ForwardKLLoss, GeneralizedJSDLoss, ReverseKLLoss

FeatureShapes = list[tuple[Shape, Shape]]
C = TypeVar("C", bound=MethodConfig)
LossBuilder = Callable[[C], nn.Module]
FeatureLossBuilder = Callable[[C, FeatureShapes], nn.Module]

LOSSES: dict[type[MethodConfig], LossBuilder[Any]] = {}
FEATURE_LOSSES: dict[type[MethodConfig], FeatureLossBuilder[Any]] = {}


def register(config_cls: type[C]) -> Callable[[LossBuilder[C]], LossBuilder[C]]:
    """Registers ``build(config) -> loss`` for a logit or sequence method."""
    if config_cls.kind is MethodKind.FEATURE:
        raise TypeError(f"{config_cls.__name__} is a feature method: use register_feature")

    def add(build: LossBuilder[C]) -> LossBuilder[C]:
        LOSSES[config_cls] = build
        return build

    return add


def register_feature(
    config_cls: type[C],
) -> Callable[[FeatureLossBuilder[C]], FeatureLossBuilder[C]]:
    """Registers ``build(config, feature_shapes) -> loss`` for a feature method."""
    if config_cls.kind is not MethodKind.FEATURE:
        raise TypeError(f"{config_cls.__name__} is a {config_cls.kind} method: use register")

    def add(build: FeatureLossBuilder[C]) -> FeatureLossBuilder[C]:
        FEATURE_LOSSES[config_cls] = build
        return build

    return add


def build_loss(config: MethodConfig, feature_shapes: FeatureShapes | None = None) -> nn.Module:
    """The loss of ``config``'s method; a feature method needs the shapes of its layer pairs."""
    if config.kind is not MethodKind.FEATURE:
        return LOSSES[type(config)](config)
    if feature_shapes is None:
        raise ValueError(
            f"{type(config).__name__} matches hooked layers: give the (student, teacher) shapes "
            "of its layer pairs"
        )
    return FEATURE_LOSSES[type(config)](config, feature_shapes)


class WithLabels(nn.Module):
    """A teacher-only divergence mixed with cross-entropy: ``alpha * div + (1 - alpha) * CE``."""

    def __init__(self, divergence: nn.Module, alpha: float) -> None:
        super().__init__()
        self.divergence, self.alpha = divergence, alpha

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        divergence, terms = self.divergence(student_logits, teacher_logits)
        ce = F.cross_entropy(upcast(student_logits), labels)
        total = self.alpha * divergence + (1.0 - self.alpha) * ce
        return total, {**terms, "ce_loss": ce.detach()}


@register(KnowledgeDistillation)
def _kd(c: KnowledgeDistillation) -> nn.Module:
    return KDLoss(temperature=c.temperature, alpha=c.alpha)


@register(LogitMSE)
def _mse(c: LogitMSE) -> nn.Module:
    return LogitMSELoss(alpha=c.alpha)


@register(DecoupledKD)
def _dkd(c: DecoupledKD) -> nn.Module:
    return DKDLoss(temperature=c.temperature, tckd_weight=c.tckd_weight, nckd_weight=c.nckd_weight)


@register(DIST)
def _dist(c: DIST) -> nn.Module:
    return DISTLoss(
        temperature=c.temperature, inter_weight=c.inter_weight, intra_weight=c.intra_weight
    )


@register(StandardizedKD)
def _ls_kd(c: StandardizedKD) -> nn.Module:
    return StandardizedKDLoss(temperature=c.temperature, alpha=c.alpha)


@register(ForwardKL)
def _forward_kl(c: ForwardKL) -> nn.Module:
    return WithLabels(ForwardKLLoss(temperature=c.temperature), alpha=c.alpha)


@register(ReverseKL)
def _reverse_kl(c: ReverseKL) -> nn.Module:
    return WithLabels(ReverseKLLoss(temperature=c.temperature), alpha=c.alpha)


@register(GeneralizedJSD)
def _jsd(c: GeneralizedJSD) -> nn.Module:
    return WithLabels(GeneralizedJSDLoss(beta=c.beta, temperature=c.temperature), alpha=c.alpha)


@register_feature(FitNets)
def _fitnets(c: FitNets, shapes: FeatureShapes) -> nn.Module:
    # The regressors are sized from the shapes.
    return FeatureKD(FitNetsLoss(shapes, weight=c.weight), temperature=c.temperature, alpha=c.alpha)


@register_feature(AttentionTransfer)
def _at(c: AttentionTransfer, shapes: FeatureShapes) -> nn.Module:
    return FeatureKD(
        AttentionTransferLoss(weight=c.weight), temperature=c.temperature, alpha=c.alpha
    )


@register_feature(SimilarityPreserving)
def _sp(c: SimilarityPreserving, shapes: FeatureShapes) -> nn.Module:
    return FeatureKD(
        SimilarityPreservingLoss(weight=c.weight), temperature=c.temperature, alpha=c.alpha
    )


@register_feature(RelationalKD)
def _rkd(c: RelationalKD, shapes: FeatureShapes) -> nn.Module:
    criterion = RKDLoss(distance_weight=c.distance_weight, angle_weight=c.angle_weight)
    return FeatureKD(criterion, temperature=c.temperature, alpha=c.alpha)


@register_feature(HiddenStates)
def _hidden_states(c: HiddenStates, shapes: FeatureShapes) -> nn.Module:
    # Per-token widths: the adapters map the student's hidden size to the teacher's.
    widths = [(student[-1], teacher[-1]) for student, teacher in shapes]
    criterion = HiddenStateLoss(widths, weight=c.weight)
    return FeatureKD(criterion, temperature=c.temperature, alpha=c.alpha)


@register_feature(AttentionKL)
def _attention_kl(c: AttentionKL, shapes: FeatureShapes) -> nn.Module:
    return FeatureKD(AttentionKLLoss(weight=c.weight), temperature=c.temperature, alpha=c.alpha)
