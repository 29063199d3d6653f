"""Losses on mixed batches (mixup, Zhang et al. 2018; cutmix, Yun et al. 2019): each sample is
``lam`` of itself and ``1 - lam`` of a partner, so its label is too."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from worker.losses.common import Terms, upcast

LogitLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Terms]]


def mixed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor, lam: float
) -> torch.Tensor:
    """``lam * CE(z, y_a) + (1 - lam) * CE(z, y_b)``, each the batch mean; equal to the
    cross-entropy against the mixed one-hot target ``lam e_a + (1 - lam) e_b``, whose gradient
    in the logits is ``(softmax(z) - lam e_a - (1 - lam) e_b) / B``. Logits ``[B, C]``, labels
    ``[B]`` (int64); the softmax in float32 at least."""
    z = upcast(logits)
    return lam * F.cross_entropy(z, labels) + (1.0 - lam) * F.cross_entropy(z, partner_labels)


def mixed_label_loss(
    loss_fn: LogitLoss,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    partner_labels: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, Terms]:
    """A logit method's loss on a mixed batch: ``lam * L(y_a) + (1 - lam) * L(y_b)``, its terms
    weighted alike.

    The teacher's logits are its outputs on the mixed images (online), so a teacher term that
    does not read the labels (KD, MSE, DIST, LS-KD, the divergences) is unchanged, and the
    cross-entropy term becomes ``mixed_cross_entropy``: Hinton KD gives ``alpha T^2 KL +
    (1 - alpha) (lam CE(y_a) + (1 - lam) CE(y_b))``. DKD's target/non-target split is taken for
    each label set and weighted the same way.
    """
    total, terms = loss_fn(student_logits, teacher_logits, labels)
    if lam == 1.0:
        return total, terms
    partner_total, partner_terms = loss_fn(student_logits, teacher_logits, partner_labels)
    mixed = {name: lam * value + (1.0 - lam) * partner_terms[name] for name, value in terms.items()}
    return lam * total + (1.0 - lam) * partner_total, mixed
