"""Logit-matching losses beyond Hinton KD. Each takes student and teacher logits ``[B, C]`` and
labels ``[B]`` (int64), runs its softmaxes in float32, and returns the total with its terms."""

import torch
import torch.nn.functional as F
from torch import nn

from worker.losses.common import Terms, upcast


class LogitMSELoss(nn.Module):
    """Regression on logits (Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?").

    ``loss = alpha * mean_{b,c} (s - t)^2 + (1 - alpha) * CE(s, y)``
    """

    def __init__(self, alpha: float = 0.9) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, Terms]:
        mse = F.mse_loss(upcast(student_logits), upcast(teacher_logits))
        ce = F.cross_entropy(upcast(student_logits), labels)
        total = self.alpha * mse + (1.0 - self.alpha) * ce
        return total, {"mse_loss": mse.detach(), "ce_loss": ce.detach()}


class DKDLoss(nn.Module):
    """Decoupled KD (Zhao et al., CVPR 2022).

    With ``p = softmax(z / T)`` and the target class ``y``:
    TCKD = ``T^2 * KL([p_t^y, 1 - p_t^y] || [p_s^y, 1 - p_s^y])`` (binary: target vs the rest);
    NCKD = ``T^2 * KL(p̂_t || p̂_s)``, ``p̂`` the softmax over the non-target classes only.
    ``loss = CE(s, y) + tckd_weight * TCKD + nckd_weight * NCKD`` (the paper's alpha and beta),
    KL averaged over the batch. The paper's defaults: ``tckd_weight=1, nckd_weight=8, T=4``.
    """

    def __init__(
        self, temperature: float = 4.0, tckd_weight: float = 1.0, nckd_weight: float = 8.0
    ) -> None:
        super().__init__()
        self.temperature, self.tckd_weight, self.nckd_weight = temperature, tckd_weight, nckd_weight

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, Terms]:
        t = self.temperature
        s, te = upcast(student_logits) / t, upcast(teacher_logits) / t
        target = F.one_hot(labels, s.shape[-1]).bool()
        p_s, p_t = s.softmax(-1), te.softmax(-1)
        # Binary target / non-target distributions.
        b_s = torch.stack([p_s[target], 1.0 - p_s[target]], dim=-1).clamp_min(1e-12)
        b_t = torch.stack([p_t[target], 1.0 - p_t[target]], dim=-1).clamp_min(1e-12)
        tckd = (b_t * (b_t.log() - b_s.log())).sum(-1).mean() * t * t
        # Non-target distributions: the target logit removed (−inf) before the softmax.
        masked_s = s.masked_fill(target, float("-inf")).log_softmax(-1)
        masked_t = te.masked_fill(target, float("-inf")).log_softmax(-1)
        nckd_terms = masked_t.exp() * (masked_t - masked_s)
        nckd = nckd_terms.masked_fill(target, 0.0).sum(-1).mean() * t * t
        ce = F.cross_entropy(upcast(student_logits), labels)
        total = ce + self.tckd_weight * tckd + self.nckd_weight * nckd
        return total, {
            "tckd_loss": tckd.detach(),
            "nckd_loss": nckd.detach(),
            "ce_loss": ce.detach(),
        }


def _pearson_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``1 - Pearson correlation`` of each row of ``a`` with that of ``b``."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)).mean()


class DISTLoss(nn.Module):
    """DIST: Knowledge Distillation from A Stronger Teacher (Huang et al., NeurIPS 2022).

    With ``Y = softmax(z / T)`` row-wise (``[B, C]``):
    inter-class = mean over samples of ``1 - pearson(Y_s[b], Y_t[b])``;
    intra-class = mean over classes of ``1 - pearson(Y_s[:, c], Y_t[:, c])``.
    ``loss = CE(s, y) + T^2 * (inter_weight * inter + intra_weight * intra)`` (the paper's beta
    and gamma; both 1 by default, with ``T = 1``).
    """

    def __init__(
        self, temperature: float = 1.0, inter_weight: float = 1.0, intra_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.inter_weight, self.intra_weight = inter_weight, intra_weight

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, Terms]:
        t = self.temperature
        y_s = (upcast(student_logits) / t).softmax(-1)
        y_t = (upcast(teacher_logits) / t).softmax(-1)
        inter = _pearson_distance(y_s, y_t) * t * t
        intra = _pearson_distance(y_s.T, y_t.T) * t * t
        ce = F.cross_entropy(upcast(student_logits), labels)
        total = ce + self.inter_weight * inter + self.intra_weight * intra
        return total, {
            "inter_loss": inter.detach(),
            "intra_loss": intra.detach(),
            "ce_loss": ce.detach(),
        }


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each sample's logits: ``(z - mean(z)) / (std(z) + eps)`` (sample std, n - 1)."""
    return (logits - logits.mean(-1, keepdim=True)) / (logits.std(-1, keepdim=True) + eps)


class StandardizedKDLoss(nn.Module):
    """KD with logit standardisation (Sun et al., CVPR 2024, "Logit Standardization in KD").

    Hinton KD on Z-scored logits, so the student matches the teacher's logit *relations* rather
    than their scale: ``loss = alpha * T^2 * KL(softmax(Z(t)/T) || softmax(Z(s)/T)) +
    (1 - alpha) * CE(s, y)``. The paper's base temperature is 2.
    """

    def __init__(self, temperature: float = 2.0, alpha: float = 0.9) -> None:
        super().__init__()
        self.temperature, self.alpha = temperature, alpha

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, Terms]:
        t = self.temperature
        log_s = (standardize(upcast(student_logits)) / t).log_softmax(-1)
        log_t = (standardize(upcast(teacher_logits)) / t).log_softmax(-1)
        soft = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * t * t
        ce = F.cross_entropy(upcast(student_logits), labels)
        total = self.alpha * soft + (1.0 - self.alpha) * ce
        return total, {"kd_loss": soft.detach(), "ce_loss": ce.detach()}
