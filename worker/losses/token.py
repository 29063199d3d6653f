"""Token-level divergences for sequence outputs (language models): logits ``[B, L, V]`` and a
padding mask ``[B, L]`` (True where a position counts). Classification logits ``[B, C]`` are one
position per sample. Each divergence is summed over the vocabulary and averaged over the positions
that count; softmaxes run in float32."""

import math

import torch
from torch import nn

from worker.losses.common import Terms, upcast


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from log-probabilities (0 log 0 = 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


class _TokenDivergence(nn.Module):
    """Shared plumbing: temperature-softened log-probabilities in, masked mean times ``T^2`` out."""

    name = ""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def per_position(self, log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Terms]:
        t = self.temperature
        log_s = (upcast(student_logits) / t).log_softmax(-1)
        log_t = (upcast(teacher_logits) / t).log_softmax(-1)
        loss = _masked_mean(self.per_position(log_s, log_t), mask) * t * t
        return loss, {self.name: loss.detach()}


class ForwardKLLoss(_TokenDivergence):
    """Forward KL, ``KL(p_teacher || p_student)`` at temperature ``T`` (times ``T^2``):
    mean-seeking, the classic word-level KD (Kim & Rush 2016)."""

    name = "forward_kl"

    def per_position(self, log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        return _kl(log_t, log_s)


class ReverseKLLoss(_TokenDivergence):
    """Reverse KL, ``KL(p_student || p_teacher)`` at temperature ``T`` (times ``T^2``):
    mode-seeking (MiniLLM, Gu et al. ICLR 2024)."""

    name = "reverse_kl"

    def per_position(self, log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        return _kl(log_s, log_t)


class GeneralizedJSDLoss(_TokenDivergence):
    """Generalised Jensen-Shannon divergence (Agarwal et al., ICLR 2024, GKD).

    ``m = beta * p_teacher + (1 - beta) * p_student``;
    ``JSD_beta = beta * KL(p_teacher || m) + (1 - beta) * KL(p_student || m)``.
    ``beta = 0.5`` is the symmetric JSD (at most ln 2). It vanishes at ``beta`` 0 and 1, so
    ``beta`` lies strictly between; use forward or reverse KL for the limits.
    """

    name = "jsd"

    def __init__(self, beta: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        if not 0.0 < beta < 1.0:
            raise ValueError("beta must lie strictly between 0 and 1")
        self.beta = beta

    def per_position(self, log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        beta = self.beta
        # log m computed stably: logsumexp of the two weighted log-probabilities.
        log_m = torch.logsumexp(
            torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]), dim=0
        )
        return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
