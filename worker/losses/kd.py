import torch
import torch.nn.functional as F
from torch import nn

from worker.losses.common import upcast


class KDLoss(nn.Module):
    """Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).

    ``loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)``

    ``alpha`` weights the soft-target (teacher) term; ``alpha = 1`` is pure distillation and
    ``alpha = 0`` plain supervised training. The ``T^2`` factor keeps the soft term's gradients on
    the scale of the hard term's as ``T`` changes. KL is averaged over the batch (``batchmean``),
    the mathematically correct reduction. Shapes: logits ``[B, C]``, labels ``[B]`` (int64).
    Softmaxes run in float32 whatever the logits' dtype (bf16 logits lose the tail otherwise).
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = self.temperature
        student_log_p = F.log_softmax(upcast(student_logits) / t, dim=-1)
        teacher_log_p = F.log_softmax(upcast(teacher_logits) / t, dim=-1)
        # kl_div(input=log q_student, target=log p_teacher) = KL(p_teacher || q_student).
        soft = (
            F.kl_div(student_log_p, teacher_log_p, log_target=True, reduction="batchmean") * t * t
        )
        hard = F.cross_entropy(upcast(student_logits), labels)
        total = self.alpha * soft + (1.0 - self.alpha) * hard
        return total, {"kd_loss": soft.detach(), "ce_loss": hard.detach()}
