"""Distillation losses, keyed by the ``method`` a job spec names.

Logit methods (``LOSSES``) take the spec's parameters as keyword arguments and return a module
called as ``loss(student_logits, teacher_logits, labels) -> (total, terms)``. Feature methods
(``FEATURE_LOSSES``) also take the per-sample shapes of their (student, teacher) layer pairs, and
are called with the two models' hooked outputs as well (see ``FeatureKD``).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

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
from worker.losses.token import ForwardKLLoss, GeneralizedJSDLoss, ReverseKLLoss


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


def _with_labels(divergence: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(alpha: float, **params: float) -> nn.Module:
        return WithLabels(divergence(**params), alpha)

    return build


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "kd": KDLoss,
    "mse": LogitMSELoss,
    "dkd": DKDLoss,
    "dist": DISTLoss,
    "ls_kd": StandardizedKDLoss,
    "forward_kl": _with_labels(ForwardKLLoss),
    "reverse_kl": _with_labels(ReverseKLLoss),
    "jsd": _with_labels(GeneralizedJSDLoss),
}


def build_loss(method: str, **params: float) -> nn.Module:
    return LOSSES[method](**params)


def _shapeless(criterion: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(shapes: list[tuple[Shape, Shape]], **params: float) -> nn.Module:
        return criterion(**params)

    return build


FEATURE_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "fitnets": FitNetsLoss,  # sizes its adapters from the shapes
    "at": _shapeless(AttentionTransferLoss),
    "sp": _shapeless(SimilarityPreservingLoss),
    "rkd": _shapeless(RKDLoss),
}


def build_feature_loss(
    method: str,
    shapes: list[tuple[Shape, Shape]],
    temperature: float,
    alpha: float,
    **params: float,
) -> FeatureKD:
    return FeatureKD(FEATURE_LOSSES[method](shapes, **params), temperature, alpha)
