"""The KD loss against the formula, computed by hand in float64."""

import math

import pytest
import torch

from worker.losses import KDLoss


def softmax(row: list[float], t: float) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def reference(
    student: list[list[float]],
    teacher: list[list[float]],
    labels: list[int],
    t: float,
    alpha: float,
) -> float:
    """alpha * T^2 * mean_b KL(p_teacher || p_student) + (1 - alpha) * mean_b CE, written out."""
    soft = hard = 0.0
    for s, tt, y in zip(student, teacher, labels, strict=True):
        p_t, p_s = softmax(tt, t), softmax(s, t)
        soft += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
        hard += -math.log(softmax(s, 1.0)[y])
    n = len(labels)
    return alpha * t * t * soft / n + (1 - alpha) * hard / n


STUDENT = [[1.0, 2.0, 0.5], [0.2, -1.0, 3.0]]
TEACHER = [[2.0, 1.0, -1.0], [0.0, 0.5, 4.0]]
LABELS = [1, 2]


@pytest.mark.parametrize(("t", "alpha"), [(1.0, 0.5), (4.0, 0.9), (2.0, 1.0), (3.0, 0.0)])
def test_value_matches_hand_computation(t: float, alpha: float) -> None:
    loss, _ = KDLoss(t, alpha)(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS))
    assert loss.item() == pytest.approx(reference(STUDENT, TEACHER, LABELS, t, alpha), rel=1e-5)


def test_known_value_at_temperature_one() -> None:
    # Two classes: p_t = softmax([0, ln 3]) = [1/4, 3/4]; p_s = [1/2, 1/2].
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812035...
    student, teacher = torch.zeros(1, 2), torch.tensor([[0.0, math.log(3.0)]])
    loss, terms = KDLoss(1.0, 1.0)(student, teacher, torch.tensor([0]))
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert terms["kd_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert terms["ce_loss"].item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_arguments_are_not_swapped() -> None:
    """KL(p_teacher || p_student) differs from KL(p_student || p_teacher) here: the first is KD."""
    student, teacher = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[3.0, 0.0, -3.0]])
    loss, _ = KDLoss(1.0, 1.0)(student, teacher, torch.tensor([0]))
    p_t = softmax([3.0, 0.0, -3.0], 1.0)
    forward_kl = sum(p * math.log(p * 3) for p in p_t)
    reverse_kl = sum((1 / 3) * math.log((1 / 3) / p) for p in p_t)
    assert loss.item() == pytest.approx(forward_kl, rel=1e-5)
    assert abs(forward_kl - reverse_kl) > 0.1


def test_equal_logits_give_zero_soft_loss_and_gradient() -> None:
    logits = torch.tensor([[0.3, 0.3, 0.3], [1.0, 2.0, 3.0]], requires_grad=True)
    loss, terms = KDLoss(4.0, 1.0)(logits, logits.detach().clone(), torch.tensor([0, 1]))
    loss.backward()
    assert terms["kd_loss"].item() == pytest.approx(0.0, abs=1e-7)
    assert logits.grad is not None
    assert torch.allclose(logits.grad, torch.zeros_like(logits), atol=1e-7)


def test_soft_loss_is_never_negative() -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = (
        torch.randn(64, 10, generator=generator),
        torch.randn(64, 10, generator=generator),
    )
    _, terms = KDLoss(2.0, 0.5)(student, teacher, torch.zeros(64, dtype=torch.long))
    assert terms["kd_loss"].item() > 0


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_gradient_matches_closed_form(t: float) -> None:
    """dL/ds = alpha * T * (softmax(s/T) - softmax(t/T)) / B + (1-alpha) * (softmax(s) - y) / B."""
    alpha = 0.7
    student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    teacher, labels = torch.tensor(TEACHER, dtype=torch.float64), torch.tensor(LABELS)
    loss, _ = KDLoss(t, alpha)(student, teacher, labels)
    loss.backward()
    b = len(LABELS)
    s = student.detach()
    expected = alpha * t * (torch.softmax(s / t, -1) - torch.softmax(teacher / t, -1)) / b
    expected += (1 - alpha) * (torch.softmax(s, -1) - torch.nn.functional.one_hot(labels, 3)) / b
    assert student.grad is not None
    assert torch.allclose(student.grad, expected, atol=1e-6)


def test_softmax_runs_in_float32_for_bf16_logits() -> None:
    student = torch.tensor(STUDENT).to(torch.bfloat16)
    teacher = torch.tensor(TEACHER).to(torch.bfloat16)
    loss, _ = KDLoss(4.0, 0.9)(student, teacher, torch.tensor(LABELS))
    assert loss.dtype == torch.float32
    expected = reference(student.float().tolist(), teacher.float().tolist(), LABELS, 4.0, 0.9)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
