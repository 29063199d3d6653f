"""Every method in the catalogue against a hand-written float64 reference: values, gradients and
the edge cases (temperature 1, all-equal logits, masked positions)."""

import math
import typing

import pytest
import torch

from app.jobs.methods import ForwardKL
from worker.losses import build_loss
from worker.losses.logit import DISTLoss, DKDLoss, LogitMSELoss, StandardizedKDLoss
from worker.losses.token import ForwardKLLoss, GeneralizedJSDLoss, ReverseKLLoss

S = [[1.0, 2.0, 0.5, -1.0], [0.2, -1.0, 3.0, 0.0], [0.0, 0.0, 1.0, 2.0]]
T = [[2.0, 1.0, -1.0, 0.0], [0.0, 0.5, 4.0, 1.0], [1.0, -2.0, 0.5, 3.0]]
Y = [1, 2, 3]


def softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def ce(row: list[float], y: int) -> float:
    return -math.log(softmax(row)[y])


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = mean(a), mean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(S, dtype=torch.float64),
        torch.tensor(T, dtype=torch.float64),
        torch.tensor(Y),
    )


def ref_mse(alpha: float) -> float:
    sq = mean(
        [(s - t) ** 2 for rs, rt in zip(S, T, strict=True) for s, t in zip(rs, rt, strict=True)]
    )
    return alpha * sq + (1 - alpha) * mean([ce(s, y) for s, y in zip(S, Y, strict=True)])


def ref_dkd(t: float, w_t: float, w_n: float) -> float:
    tckd, nckd = [], []
    for s, te, y in zip(S, T, Y, strict=True):
        ps, pt = softmax(s, t), softmax(te, t)
        tckd.append(kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]]))
        others_s = softmax([v for i, v in enumerate(s) if i != y], t)
        others_t = softmax([v for i, v in enumerate(te) if i != y], t)
        nckd.append(kl(others_t, others_s))
    cross = mean([ce(s, y) for s, y in zip(S, Y, strict=True)])
    return cross + w_t * t * t * mean(tckd) + w_n * t * t * mean(nckd)


def ref_dist(t: float, w_inter: float, w_intra: float) -> float:
    ys = [softmax(r, t) for r in S]
    yt = [softmax(r, t) for r in T]
    inter = mean([1 - pearson(a, b) for a, b in zip(ys, yt, strict=True)])
    cols_s, cols_t = list(zip(*ys, strict=True)), list(zip(*yt, strict=True))
    intra = mean([1 - pearson(list(a), list(b)) for a, b in zip(cols_s, cols_t, strict=True)])
    cross = mean([ce(s, y) for s, y in zip(S, Y, strict=True)])
    return cross + t * t * (w_inter * inter + w_intra * intra)


def zscore(row: list[float]) -> list[float]:
    m = mean(row)
    sd = math.sqrt(sum((v - m) ** 2 for v in row) / (len(row) - 1))
    return [(v - m) / (sd + 1e-7) for v in row]


def ref_lskd(t: float, alpha: float) -> float:
    soft = mean(
        [kl(softmax(zscore(te), t), softmax(zscore(s), t)) for s, te in zip(S, T, strict=True)]
    )
    return alpha * t * t * soft + (1 - alpha) * mean([ce(s, y) for s, y in zip(S, Y, strict=True)])


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        (LogitMSELoss(alpha=1.0), ref_mse(1.0)),
        (LogitMSELoss(alpha=0.3), ref_mse(0.3)),
        (DKDLoss(4.0, 1.0, 8.0), ref_dkd(4.0, 1.0, 8.0)),
        (DKDLoss(1.0, 0.5, 2.0), ref_dkd(1.0, 0.5, 2.0)),
        (DISTLoss(1.0, 1.0, 1.0), ref_dist(1.0, 1.0, 1.0)),
        (DISTLoss(4.0, 2.0, 0.5), ref_dist(4.0, 2.0, 0.5)),
        (StandardizedKDLoss(2.0, 0.9), ref_lskd(2.0, 0.9)),
        (StandardizedKDLoss(1.0, 1.0), ref_lskd(1.0, 1.0)),
    ],
)
def test_logit_methods_match_references(loss: torch.nn.Module, expected: float) -> None:
    s, t, y = tensors()
    total, _ = loss(s, t, y)
    assert total.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "loss",
    [LogitMSELoss(1.0), DKDLoss(4.0, 1.0, 8.0), DISTLoss(1.0), StandardizedKDLoss(2.0, 1.0)],
)
def test_gradients_match_finite_differences(loss: torch.nn.Module) -> None:
    s, t, y = tensors()
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(x, t, y)[0], (s,), eps=1e-6, atol=1e-5)


def test_teacher_terms_vanish_when_student_equals_teacher() -> None:
    s, _, y = tensors()
    for loss in (DKDLoss(), StandardizedKDLoss(alpha=1.0), LogitMSELoss(alpha=1.0)):
        _, terms = loss(s, s.clone(), y)
        for name, value in terms.items():
            if name != "ce_loss":
                assert value.item() == pytest.approx(0.0, abs=1e-9), (loss, name)
    _, terms = DISTLoss()(s, s.clone(), y)
    assert terms["inter_loss"].item() == pytest.approx(0.0, abs=1e-9)


def test_dkd_parts_add_up_to_kd() -> None:
    """Zhao et al.'s identity: KD = TCKD + (1 - p_t^target) * NCKD (per sample, before T^2)."""
    s, t, y = tensors()
    kd = [kl(softmax(te, 2.0), softmax(sr, 2.0)) for sr, te in zip(S, T, strict=True)]
    for i in range(3):
        loss = DKDLoss(2.0, 1.0, 1.0)
        _, terms_tckd = DKDLoss(2.0, 1.0, 0.0)(s[i : i + 1], t[i : i + 1], y[i : i + 1])
        _, terms = loss(s[i : i + 1], t[i : i + 1], y[i : i + 1])
        p_target = softmax(T[i], 2.0)[Y[i]]
        combined = (terms_tckd["tckd_loss"] + (1 - p_target) * terms["nckd_loss"]).item() / 4.0
        assert combined == pytest.approx(kd[i], rel=1e-6)


def test_standardized_kd_ignores_logit_scale_and_shift() -> None:
    s, t, y = tensors()
    a, _ = StandardizedKDLoss(2.0, 1.0)(s, t, y)
    b, _ = StandardizedKDLoss(2.0, 1.0)(s, 5.0 * t + 3.0, y)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


# Token-level: [B, L, V] with a padding mask.
SEQ_S = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]], [[0.0, 3.0, 1.0], [9.0, -9.0, 0.0]]])
SEQ_T = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 1.0], [-9.0, 9.0, 0.0]]])
MASK = torch.tensor([[True, True], [True, False]])  # the last position is padding


def per_position(fn: typing.Callable[[list[float], list[float]], float]) -> list[float]:
    out = []
    for b in range(2):
        for pos in range(2):
            if MASK[b, pos]:
                out.append(fn(SEQ_S[b, pos].tolist(), SEQ_T[b, pos].tolist()))
    return out


def jsd(s: list[float], t: list[float], beta: float, temp: float) -> float:
    ps, pt = softmax(s, temp), softmax(t, temp)
    m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps, strict=True)]
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_token_level_divergences_with_mask(temp: float) -> None:
    forward = mean(per_position(lambda s, t: kl(softmax(t, temp), softmax(s, temp)))) * temp**2
    reverse = mean(per_position(lambda s, t: kl(softmax(s, temp), softmax(t, temp)))) * temp**2
    js = mean(per_position(lambda s, t: jsd(s, t, 0.3, temp))) * temp**2
    assert ForwardKLLoss(temp)(SEQ_S, SEQ_T, MASK)[0].item() == pytest.approx(forward, rel=1e-5)
    assert ReverseKLLoss(temp)(SEQ_S, SEQ_T, MASK)[0].item() == pytest.approx(reverse, rel=1e-5)
    assert GeneralizedJSDLoss(0.3, temp)(SEQ_S, SEQ_T, MASK)[0].item() == pytest.approx(
        js, rel=1e-5
    )


def test_masked_positions_get_no_gradient() -> None:
    student = SEQ_S.clone().double().requires_grad_(True)
    for loss in (ForwardKLLoss(), ReverseKLLoss(), GeneralizedJSDLoss()):
        student.grad = None
        loss(student, SEQ_T.double(), MASK)[0].backward()
        assert student.grad is not None
        assert torch.all(student.grad[1, 1] == 0)
        assert torch.any(student.grad[0, 0] != 0)
        assert torch.autograd.gradcheck(
            lambda x, loss=loss: loss(x, SEQ_T.double(), MASK)[0], (student,), eps=1e-6, atol=1e-5
        )


def test_symmetric_jsd_is_bounded_by_ln2() -> None:
    far_s = torch.tensor([[50.0, -50.0]])
    far_t = torch.tensor([[-50.0, 50.0]])
    value = GeneralizedJSDLoss(0.5)(far_s, far_t)[0].item()
    assert value == pytest.approx(math.log(2), rel=1e-4)
    assert ForwardKLLoss()(far_s, far_s.clone())[0].item() == pytest.approx(0.0, abs=1e-9)


def test_forward_and_reverse_kl_differ_as_documented() -> None:
    s, t = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[3.0, 0.0, -3.0]])
    p_t = softmax([3.0, 0.0, -3.0])
    assert ForwardKLLoss()(s, t)[0].item() == pytest.approx(kl(p_t, [1 / 3] * 3), rel=1e-6)
    assert ReverseKLLoss()(s, t)[0].item() == pytest.approx(kl([1 / 3] * 3, p_t), rel=1e-6)


def test_token_methods_mix_labels_by_alpha() -> None:
    s, t, y = tensors()
    pure, _ = build_loss(ForwardKL(method="forward_kl", temperature=1.0, alpha=1.0))(s, t, y)
    half, terms = build_loss(ForwardKL(method="forward_kl", temperature=1.0, alpha=0.5))(s, t, y)
    expected = 0.5 * pure.item() + 0.5 * mean([ce(r, c) for r, c in zip(S, Y, strict=True)])
    assert half.item() == pytest.approx(expected, rel=1e-6)
    assert "ce_loss" in terms
