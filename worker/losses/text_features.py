"""Transformer-layer distillation criteria for text: the student matches the teacher's hidden
states or attention distributions over each record's real tokens.

Each criterion is called as ``criterion(student_features, teacher_features, mask) -> (total,
terms)`` with aligned lists (pair ``j`` is ``(student_features[j], teacher_features[j])``) and the
records' attention ``mask`` ``[B, L]`` (1 for a real token, 0 for padding). Hidden states are
``[B, L, D]``; attention distributions ``[B, heads, L, L]`` (queries by keys, each row summing to
1 over the real keys). Padding positions never count. Teacher features are detached; the maths runs
in float32 at least. ``terms`` hold the unweighted sums over pairs, detached.
"""

import torch
from torch import nn

from worker.losses.common import Terms, upcast


def masked_token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``per_token`` ``[B, L]`` over the real tokens (``mask`` ``[B, L]``)."""
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


class HiddenStateLoss(nn.Module):
    """TinyBERT's hidden-state loss (Jiao et al., Findings of EMNLP 2020, eq. 8):
    ``weight * sum_j mean_{real tokens} mean_d (H_s,j W_j - H_t,j)^2``.

    ``widths[j] = (student_width, teacher_width)``: ``W_j`` is a learned ``Linear`` without bias
    (TinyBERT's ``W_h``), used even when the widths are equal.
    """

    def __init__(self, widths: list[tuple[int, int]], weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight
        self.adapters = nn.ModuleList(nn.Linear(s, t, bias=False) for s, t in widths)

    def forward(
        self,
        student_features: list[torch.Tensor],
        teacher_features: list[torch.Tensor],
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, Terms]:
        total = torch.zeros((), device=mask.device)
        for adapter, s, t in zip(self.adapters, student_features, teacher_features, strict=True):
            projected = adapter(upcast(s))
            per_token = (projected - upcast(t.detach())).pow(2).mean(dim=-1)
            total = total + masked_token_mean(per_token, mask)
        return self.weight * total, {"hidden_loss": total.detach()}


class AttentionKLLoss(nn.Module):
    """MiniLM's self-attention distribution transfer (Wang et al., NeurIPS 2020, eq. 5):
    ``weight * sum_j mean_{heads, real queries} KL(A_t,j || A_s,j)``, the KL over the keys of each
    query's attention distribution, with ``0 log 0 = 0``."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(
        self,
        student_features: list[torch.Tensor],
        teacher_features: list[torch.Tensor],
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, Terms]:
        total = torch.zeros((), device=mask.device)
        for s, t in zip(student_features, teacher_features, strict=True):
            if s.shape != t.shape:
                raise ValueError(
                    f"attention distributions must match in shape [B, heads, L, L]; got "
                    f"{tuple(s.shape)} and {tuple(t.shape)}"
                )
            p_t, p_s = upcast(t.detach()), upcast(s)
            tiny = torch.finfo(p_s.dtype).tiny
            log_ratio = torch.log(p_t.clamp_min(tiny)) - torch.log(p_s.clamp_min(tiny))
            kl = torch.where(p_t > 0, p_t * log_ratio, torch.zeros_like(p_t)).sum(dim=-1)
            total = total + masked_token_mean(kl.mean(dim=1), mask)  # heads, then real queries
        return self.weight * total, {"attention_kl": total.detach()}
