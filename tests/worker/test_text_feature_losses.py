"""TinyBERT's hidden-state loss and MiniLM's attention KL against values computed by hand, with
padding that must not count."""

import math

import pytest
import torch

from worker.losses.text_features import AttentionKLLoss, HiddenStateLoss, masked_token_mean

# Two records of 3 and 2 real tokens, padded to 3.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_masked_token_mean_counts_real_tokens_only() -> None:
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    assert masked_token_mean(per_token, MASK).item() == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)


def test_hidden_state_loss_is_the_masked_mse_after_the_adapter() -> None:
    loss = HiddenStateLoss([(2, 2)], weight=2.0)
    with torch.no_grad():
        loss.adapters[0].weight.copy_(torch.eye(2))
    student = torch.zeros(2, 3, 2, requires_grad=True)
    teacher = torch.tensor(
        [[[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]], [[0.0, 3.0], [1.0, 1.0], [50.0, 50.0]]]
    )
    total, terms = loss([student], [teacher], MASK)
    # Per real token, mean over d of t^2: 1, 2, 0, 4.5, 1; the padded token (2500) is ignored.
    expected = (1 + 2 + 0 + 4.5 + 1) / 5
    assert terms["hidden_loss"].item() == pytest.approx(expected)
    assert total.item() == pytest.approx(2.0 * expected)
    total.backward()
    assert student.grad is not None
    # d/ds of 2 * mean_tokens mean_d (s - t)^2 = 2 * 2 (s - t) / (5 tokens * 2 dims).
    assert torch.allclose(student.grad[0, 0], torch.tensor([-0.4, -0.4]))
    assert torch.equal(student.grad[1, 2], torch.zeros(2))  # padding gets no gradient


def test_hidden_state_adapters_map_student_width_to_teacher_width() -> None:
    loss = HiddenStateLoss([(4, 6)])
    assert loss.adapters[0].weight.shape == (6, 4)
    total, _ = loss([torch.randn(2, 3, 4)], [torch.randn(2, 3, 6)], MASK)
    assert total.ndim == 0 and math.isfinite(total.item())


def test_attention_kl_is_zero_for_equal_distributions_and_the_kl_otherwise() -> None:
    torch.manual_seed(0)
    teacher = torch.softmax(torch.randn(2, 2, 3, 3), dim=-1)
    loss = AttentionKLLoss(weight=1.0)
    total, _ = loss([teacher.clone()], [teacher], MASK)
    assert total.item() == pytest.approx(0.0, abs=1e-7)
    student = torch.full((2, 2, 3, 3), 1.0 / 3.0, requires_grad=True)
    total, terms = loss([student], [teacher], MASK)
    kl = (teacher * (teacher.log() - math.log(1.0 / 3.0))).sum(-1).mean(dim=1)  # [B, L]
    expected = (kl[0].sum() + kl[1, :2].sum()) / 5
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["attention_kl"].item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert student.grad is not None and torch.equal(student.grad[1, :, 2], torch.zeros(2, 3))


def test_attention_kl_treats_zero_teacher_probabilities_as_zero_terms() -> None:
    """0 log 0 = 0: masked keys (probability 0 for both) add nothing, never NaN."""
    teacher = torch.tensor([[[[0.5, 0.5, 0.0]]]])
    student = torch.tensor([[[[0.25, 0.75, 0.0]]]])
    total, _ = AttentionKLLoss()([student], [teacher], torch.tensor([[1]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="match in shape"):
        AttentionKLLoss()([torch.zeros(1, 2, 1, 1)], [torch.zeros(1, 3, 1, 1)], torch.ones(1, 1))
