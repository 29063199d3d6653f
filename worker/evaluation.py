"""Figures of merit for a student against its teacher: accuracy, agreement, KL, calibration."""

import torch

ECE_BINS = 15


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose top class is the label, in float64 (exactly what a user
    counting the served student's correct answers gets)."""
    return (logits.argmax(dim=-1) == labels).double().mean().item()


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of samples on which student and teacher predict the same class."""
    return (student_logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)).double().mean().item()


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Mean ``KL(p_teacher || p_student)`` at temperature 1, in nats."""
    log_s = student_logits.double().log_softmax(-1)
    log_t = teacher_logits.double().log_softmax(-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()


def expected_calibration_error(
    logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> float:
    """ECE (Guo et al. 2017): ``sum_b |B_b|/N * |accuracy(B_b) - confidence(B_b)|`` over equal-width
    confidence bins ``(i/bins, (i+1)/bins]``."""
    probabilities = logits.double().softmax(-1)
    confidence, predictions = probabilities.max(-1)
    correct = (predictions == labels).double()
    # Bin i holds confidences in (i/bins, (i+1)/bins]; ceil maps 1.0 to the last bin.
    index = (torch.ceil(confidence * bins) - 1).clamp(0, bins - 1).long()
    gap = torch.zeros(bins, dtype=torch.float64, device=logits.device)
    gap.index_add_(0, index, correct - confidence)
    return (gap.abs().sum() / len(labels)).item()


def per_class_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> list[float | None]:
    """Accuracy on each class's samples (None for a class absent from the labels)."""
    correct = (logits.argmax(-1) == labels).double()
    hits = torch.zeros(num_classes, dtype=torch.float64, device=logits.device).index_add_(
        0, labels, correct
    )
    counts = torch.bincount(labels, minlength=num_classes).double()
    return [None if c == 0 else h / c for h, c in zip(hits.tolist(), counts.tolist(), strict=True)]


def logit_metrics(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    return {
        "accuracy": accuracy(student_logits, labels),
        "agreement": agreement(student_logits, teacher_logits),
        "kl_to_teacher": kl_to_teacher(student_logits, teacher_logits),
        "ece": expected_calibration_error(student_logits, labels),
    }
