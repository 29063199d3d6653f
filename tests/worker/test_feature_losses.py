"""Feature criteria against hand-written references: values, gradients and the edge cases.

The references are plain Python loops over nested lists. They use only ``+ - * / **`` and
``abs``, so they run on floats (float64 values) and, fed 0-dim tensor views of a float64 leaf, on
autograd scalars: that gives the gradient of a reference written element by element.
"""

import itertools
import math
import typing

import pytest
import torch

from worker.losses import features
from worker.losses.features import (
    AttentionTransferLoss,
    FeatureKD,
    FitNetsLoss,
    RKDLoss,
    SimilarityPreservingLoss,
)

# Nested lists of numbers: floats, or 0-dim tensors when a reference's gradient is wanted.
Nested = typing.Any
Reference = typing.Callable[[Nested, Nested], typing.Any]

# [B=3, C=2, H=2, W=2] student maps, [3, 3, 2, 2] teacher maps, [3, 4] and [3, 5] vectors.
S_MAP = [
    [[[1.0, -0.5], [0.3, 2.0]], [[0.0, 1.5], [-1.2, 0.7]]],
    [[[0.4, 0.9], [-2.0, 0.1]], [[1.1, -0.3], [0.6, 0.8]]],
    [[[-0.7, 0.2], [1.3, -1.0]], [[0.5, 0.5], [2.2, -0.4]]],
]
T_MAP = [
    [[[0.5, 1.0], [-0.2, 0.9]], [[1.2, 0.0], [0.4, -0.8]], [[0.3, 0.3], [1.0, 0.2]]],
    [[[-1.0, 0.6], [0.7, 0.0]], [[0.2, 1.4], [-0.5, 0.9]], [[0.8, -0.6], [0.1, 1.1]]],
    [[[0.0, -0.9], [1.5, 0.4]], [[-0.3, 0.7], [0.9, 0.2]], [[1.3, 0.5], [-1.1, 0.6]]],
]
S_VEC = [[0.5, -1.0, 2.0, 0.3], [1.5, 0.2, -0.4, 1.0], [-0.6, 0.9, 0.1, -1.2]]
T_VEC = [[1.0, 0.0, -0.5, 2.0, 0.7], [0.3, 1.2, 0.8, -1.0, 0.0], [-0.4, -0.2, 1.6, 0.5, 0.9]]


def f64(x: Nested) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def elements(x: torch.Tensor) -> Nested:
    """Nested lists of 0-dim views of ``x``: a reference run on them back-propagates into ``x``."""
    return [elements(row) for row in x.unbind(0)] if x.dim() else x


def flat(x: Nested) -> list[typing.Any]:
    return [v for item in x for v in flat(item)] if isinstance(x, list) else [x]


def total(values: typing.Iterable[typing.Any]) -> typing.Any:
    out: typing.Any = 0.0
    for v in values:
        out = out + v
    return out


def norm(vector: list[typing.Any]) -> typing.Any:
    return total(v * v for v in vector) ** 0.5


def huber(x: typing.Any) -> typing.Any:
    """Smooth L1 with beta 1."""
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# --- references -------------------------------------------------------------------------------


def conv1x1(weight: list[list[float]], x: Nested) -> Nested:
    """``out[b][o][h][w] = sum_c weight[o][c] * x[b][c][h][w]``."""
    return [
        [
            [
                [total(row[c] * sample[c][h][w] for c in range(len(row))) for w in range(len(r))]
                for h, r in enumerate(sample[0])
            ]
            for row in weight
        ]
        for sample in x
    ]


def ref_fitnets_conv(weight: list[list[float]], s: Nested, t: Nested) -> typing.Any:
    diffs = [a - b for a, b in zip(flat(conv1x1(weight, s)), flat(t), strict=True)]
    return total(d * d for d in diffs) / len(diffs)


def ref_fitnets_linear(weight: list[list[float]], s: Nested, t: Nested) -> typing.Any:
    out = [[total(w * v for w, v in zip(row, x, strict=True)) for row in weight] for x in s]
    diffs = [a - b for a, b in zip(flat(out), flat(t), strict=True)]
    return total(d * d for d in diffs) / len(diffs)


def ref_attention(x: Nested) -> list[list[typing.Any]]:
    maps = []
    for sample in x:
        squares = [
            total(sample[c][h][w] ** 2 for c in range(len(sample))) / len(sample)
            for h in range(len(sample[0]))
            for w in range(len(sample[0][0]))
        ]
        length = norm(squares)
        maps.append([v / length for v in squares])
    return maps


def ref_at(s: Nested, t: Nested) -> typing.Any:
    """``sum_{b,k} (at_s - at_t)^2 / (B * H * W)``, unweighted."""
    a_s, a_t = ref_attention(s), ref_attention(t)
    diffs = [x - y for rs, rt in zip(a_s, a_t, strict=True) for x, y in zip(rs, rt, strict=True)]
    return total(d * d for d in diffs) / len(diffs)


def ref_normalized_gram(x: Nested) -> list[list[typing.Any]]:
    rows = [flat(sample) for sample in x]
    gram = [[total(a * b for a, b in zip(p, q, strict=True)) for q in rows] for p in rows]
    return [[g / norm(row) for g in row] for row in gram]


def ref_sp(s: Nested, t: Nested) -> typing.Any:
    g_s, g_t = ref_normalized_gram(s), ref_normalized_gram(t)
    b = len(g_s)
    return total((g_t[i][j] - g_s[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


def ref_distance_matrix(x: Nested) -> list[list[typing.Any]]:
    rows = [flat(sample) for sample in x]
    b = len(rows)
    d = [
        [
            norm([p - q for p, q in zip(rows[i], rows[j], strict=True)]) if i != j else 0.0
            for j in range(b)
        ]
        for i in range(b)
    ]
    mean = total(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
    return [[v / mean for v in row] for row in d]


def ref_rkd_distance(s: Nested, t: Nested) -> typing.Any:
    d_s, d_t = ref_distance_matrix(s), ref_distance_matrix(t)
    b = len(d_s)
    return total(huber(d_s[i][j] - d_t[i][j]) for i in range(b) for j in range(b)) / (b * b)


def ref_angles(x: Nested) -> list[typing.Any]:
    """cos of the angle at ``e_i`` between ``e_j`` and ``e_k``; 0 where an edge is degenerate."""
    rows = [flat(sample) for sample in x]
    b = len(rows)
    out: list[typing.Any] = []
    for i in range(b):
        for j in range(b):
            for k in range(b):
                if i in (j, k):
                    out.append(0.0)
                    continue
                u = [p - q for p, q in zip(rows[j], rows[i], strict=True)]
                v = [p - q for p, q in zip(rows[k], rows[i], strict=True)]
                out.append(total(a * c for a, c in zip(u, v, strict=True)) / (norm(u) * norm(v)))
    return out


def ref_rkd_angle(s: Nested, t: Nested) -> typing.Any:
    a_s, a_t = ref_angles(s), ref_angles(t)
    return total(huber(p - q) for p, q in zip(a_s, a_t, strict=True)) / len(a_s)


# --- cases: (criterion, unweighted reference, weight applied to it, student, teacher) ----------

CASES: dict[str, tuple[torch.nn.Module, Reference, float, Nested, Nested]] = {
    "at": (AttentionTransferLoss(), ref_at, 500.0, S_MAP, T_MAP),
    "sp_maps": (SimilarityPreservingLoss(), ref_sp, 3000.0, S_MAP, T_MAP),
    "sp_vectors": (SimilarityPreservingLoss(), ref_sp, 3000.0, S_VEC, T_VEC),
    "rkd_distance": (RKDLoss(25.0, 0.0), ref_rkd_distance, 25.0, S_MAP, T_MAP),
    "rkd_angle": (RKDLoss(0.0, 50.0), ref_rkd_angle, 50.0, S_VEC, T_VEC),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_match_references(name: str, dtype: torch.dtype) -> None:
    criterion, reference, weight, s, t = CASES[name]
    loss, terms = criterion([torch.tensor(s, dtype=dtype)], [torch.tensor(t, dtype=dtype)])
    expected = reference(s, t)
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx(weight * expected, rel=1e-5)
    (term,) = terms.values()
    assert term.item() == pytest.approx(expected, rel=1e-5)
    assert not term.requires_grad


def test_rkd_sums_its_two_parts() -> None:
    loss, terms = RKDLoss()([f64(S_VEC)], [f64(T_VEC)])
    distance, angle = ref_rkd_distance(S_VEC, T_VEC), ref_rkd_angle(S_VEC, T_VEC)
    assert loss.item() == pytest.approx(25 * distance + 50 * angle, rel=1e-9)
    assert terms["rkd_distance_loss"].item() == pytest.approx(distance, rel=1e-9)
    assert terms["rkd_angle_loss"].item() == pytest.approx(angle, rel=1e-9)


@pytest.mark.parametrize("name", CASES)
def test_gradients_match_the_reference_autograd(name: str) -> None:
    criterion, reference, weight, s, t = CASES[name]
    student = f64(s).requires_grad_(True)
    criterion([student], [f64(t)])[0].backward()
    by_hand = f64(s).requires_grad_(True)
    (weight * reference(elements(by_hand), t)).backward()
    assert student.grad is not None and by_hand.grad is not None
    assert torch.allclose(student.grad, by_hand.grad, rtol=1e-7, atol=1e-10)
    assert student.grad.abs().max() > 1e-3


def fitnets_with(weight: list[list[float]], shapes: tuple[tuple[int, ...], ...]) -> FitNetsLoss:
    loss = FitNetsLoss([(shapes[0], shapes[1])])
    adapter = loss.adapters[0]
    assert isinstance(adapter, torch.nn.Conv2d | torch.nn.Linear)
    with torch.no_grad():
        adapter.weight.copy_(torch.tensor(weight).reshape(adapter.weight.shape))
    return loss


W_CONV = [[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]]  # [C_t=3, C_s=2]
W_LIN = [[0.5, -1.0, 0.0, 2.0], [1.0, 0.5, -0.5, 0.0], [0.0, 0.25, 1.0, -1.0]]
W_LIN += [[1.5, 0.0, 0.5, 0.5], [-0.5, 1.0, 0.0, 0.25]]  # [D_t=5, D_s=4]


def test_fitnets_conv_value_and_hand_derived_gradient() -> None:
    """``L = mean (W s - t)^2`` over N elements: ``dL/ds[b,c,h,w] = 2/N sum_o W[o,c] r[b,o,h,w]``
    with ``r = W s - t``."""
    loss_fn = fitnets_with(W_CONV, ((2, 2, 2), (3, 2, 2)))
    student = f64(S_MAP).requires_grad_(True)
    loss, terms = loss_fn([student], [f64(T_MAP)])
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref_fitnets_conv(W_CONV, S_MAP, T_MAP), rel=1e-12)
    assert terms["fitnets_loss"].item() == pytest.approx(loss.item(), rel=1e-12)
    loss.backward()
    out = conv1x1(W_CONV, S_MAP)
    n = 3 * 3 * 2 * 2
    expected = [
        [
            [
                [
                    2.0
                    / n
                    * sum(W_CONV[o][c] * (out[b][o][h][w] - T_MAP[b][o][h][w]) for o in range(3))
                    for w in range(2)
                ]
                for h in range(2)
            ]
            for c in range(2)
        ]
        for b in range(3)
    ]
    assert student.grad is not None
    assert torch.allclose(student.grad, f64(expected), rtol=1e-10, atol=1e-12)


def test_fitnets_linear_value_and_gradient() -> None:
    loss_fn = fitnets_with(W_LIN, ((4,), (5,)))
    student = f64(S_VEC).requires_grad_(True)
    loss, _ = loss_fn([student], [f64(T_VEC)])
    assert loss.item() == pytest.approx(ref_fitnets_linear(W_LIN, S_VEC, T_VEC), rel=1e-12)
    loss.backward()
    by_hand = f64(S_VEC).requires_grad_(True)
    ref_fitnets_linear(W_LIN, elements(by_hand), T_VEC).backward()
    assert student.grad is not None and by_hand.grad is not None
    assert torch.allclose(student.grad, by_hand.grad, rtol=1e-10, atol=1e-12)


def test_fitnets_adapter_weights_get_their_gradient() -> None:
    """``dL/dW[o,c] = 2/N sum_{b,h,w} r[b,o,h,w] s[b,c,h,w]``."""
    loss_fn = fitnets_with(W_CONV, ((2, 2, 2), (3, 2, 2)))
    loss_fn([f64(S_MAP)], [f64(T_MAP)])[0].backward()
    out = conv1x1(W_CONV, S_MAP)
    expected = [
        [
            2.0
            / 36  # N = B * C_t * H * W
            * sum(
                (out[b][o][h][w] - T_MAP[b][o][h][w]) * S_MAP[b][c][h][w]
                for b in range(3)
                for h in range(2)
                for w in range(2)
            )
            for c in range(2)
        ]
        for o in range(3)
    ]
    adapter = loss_fn.adapters[0]
    assert isinstance(adapter, torch.nn.Conv2d)
    grad = adapter.weight.grad
    assert grad is not None and grad.dtype == torch.float32
    assert torch.allclose(grad.reshape(3, 2).double(), f64(expected), rtol=1e-5)


def every_criterion() -> list[tuple[torch.nn.Module, Nested, Nested]]:
    return [
        (fitnets_with(W_CONV, ((2, 2, 2), (3, 2, 2))), S_MAP, T_MAP),
        (fitnets_with(W_LIN, ((4,), (5,))), S_VEC, T_VEC),
        (AttentionTransferLoss(), S_MAP, T_MAP),
        (SimilarityPreservingLoss(), S_MAP, T_MAP),
        (RKDLoss(), S_MAP, T_MAP),
        (RKDLoss(), S_VEC, T_VEC),
    ]


def test_gradcheck_on_float64() -> None:
    for criterion, s, t in every_criterion():
        teacher = f64(t)
        assert torch.autograd.gradcheck(
            lambda x, c=criterion, te=teacher: c([x], [te])[0],
            (f64(s).requires_grad_(True),),
            eps=1e-6,
            atol=1e-5,
        ), criterion


def test_identical_features_give_zero_loss_and_gradient() -> None:
    maps = f64(S_MAP)
    identity = [[1.0, 0.0], [0.0, 1.0]]
    for criterion in (
        fitnets_with(identity, ((2, 2, 2), (2, 2, 2))),
        AttentionTransferLoss(),
        SimilarityPreservingLoss(),
        RKDLoss(),
    ):
        student = maps.clone().requires_grad_(True)
        loss, terms = criterion([student], [maps.clone()])
        loss.backward()
        assert loss.item() == pytest.approx(0.0, abs=1e-12), criterion
        assert all(v.item() == pytest.approx(0.0, abs=1e-12) for v in terms.values())
        assert student.grad is not None
        assert torch.allclose(student.grad, torch.zeros_like(student), atol=1e-9), criterion


def test_scale_invariances() -> None:
    teacher = f64(T_MAP)
    # AT normalises each sample's map: any positive scale per sample leaves it unchanged.
    per_sample = f64([0.5, 3.0, 7.0]).reshape(3, 1, 1, 1)
    assert AttentionTransferLoss()([per_sample * teacher], [teacher])[0].item() == pytest.approx(
        0.0, abs=1e-12
    )
    # SP: a global scale c multiplies G by c^2; the row normalisation removes it.
    assert SimilarityPreservingLoss()([2.0 * teacher], [teacher])[0].item() == pytest.approx(
        0.0, abs=1e-12
    )
    # RKD: distances are divided by their mean, angles use unit vectors.
    _, terms = RKDLoss()([2.0 * teacher], [teacher])
    assert terms["rkd_distance_loss"].item() == pytest.approx(0.0, abs=1e-12)
    assert terms["rkd_angle_loss"].item() == pytest.approx(0.0, abs=1e-12)
    # ...but a different student is not: the references are not trivially zero.
    assert ref_sp(S_MAP, T_MAP) > 1e-4 and ref_at(S_MAP, T_MAP) > 1e-4


def test_teacher_never_receives_gradients() -> None:
    for criterion, s, t in every_criterion():
        student = torch.tensor(s, requires_grad=True)
        teacher = torch.tensor(t, requires_grad=True)
        loss, _ = criterion([student], [teacher])
        loss.backward()
        assert teacher.grad is None, criterion
        assert student.grad is not None, criterion


def test_bf16_features_give_float32_losses() -> None:
    for criterion, s, t in every_criterion():
        student, teacher = torch.tensor(s).bfloat16(), torch.tensor(t).bfloat16()
        loss, terms = criterion([student], [teacher])
        expected, _ = criterion([student.float()], [teacher.float()])
        assert loss.dtype == torch.float32, criterion
        assert all(v.dtype == torch.float32 for v in terms.values())
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5), criterion
        # And close to the unrounded float32 features (bf16 keeps ~3 significant digits).
        exact, _ = criterion([torch.tensor(s)], [torch.tensor(t)])
        assert loss.item() == pytest.approx(exact.item(), rel=0.05), criterion


def test_several_pairs_sum_and_weights_scale_linearly() -> None:
    maps_s, maps_t, vec_s, vec_t = f64(S_MAP), f64(T_MAP), f64(S_VEC), f64(T_VEC)
    # A second map pair: same H, W for AT; the student reversed along the batch.
    maps_s2, maps_t2 = maps_s.flip(0) * 0.5, maps_t[:, :2] + 1.0
    map_pairs = ([maps_s, maps_s2], [maps_t, maps_t2])
    mixed_pairs = ([maps_s, vec_s], [maps_t, vec_t])

    fitnets = FitNetsLoss([((2, 2, 2), (3, 2, 2)), ((4,), (5,))], weight=1.0)
    fitnets_x3 = FitNetsLoss([((2, 2, 2), (3, 2, 2)), ((4,), (5,))], weight=3.0)
    fitnets_x3.load_state_dict(fitnets.state_dict())
    cases: list[tuple[torch.nn.Module, torch.nn.Module, float, tuple[Nested, Nested]]] = [
        (fitnets, fitnets_x3, 3.0, mixed_pairs),
        (AttentionTransferLoss(2.0), AttentionTransferLoss(6.0), 3.0, map_pairs),
        (SimilarityPreservingLoss(1.0), SimilarityPreservingLoss(0.5), 0.5, mixed_pairs),
        (RKDLoss(1.0, 2.0), RKDLoss(3.0, 6.0), 3.0, mixed_pairs),
    ]
    for base, scaled, factor, (students, teachers) in cases:
        loss, terms = base(students, teachers)
        if not isinstance(base, FitNetsLoss):  # its regressors are per pair: tested below
            singles = [base([s], [t]) for s, t in zip(students, teachers, strict=True)]
            assert loss.item() == pytest.approx(sum(x[0].item() for x in singles), rel=1e-12)
            for name, value in terms.items():
                expected = sum(x[1][name].item() for x in singles)
                assert value.item() == pytest.approx(expected, rel=1e-12)
        loss_scaled, terms_scaled = scaled(students, teachers)
        assert loss_scaled.item() == pytest.approx(factor * loss.item(), rel=1e-12), base
        # Terms are unweighted: the same whatever the weights.
        assert terms_scaled.keys() == terms.keys()
        for name, value in terms.items():
            assert terms_scaled[name].item() == pytest.approx(value.item(), rel=1e-12)


def test_fitnets_pair_sum_matches_single_pair_modules() -> None:
    two = FitNetsLoss([((2, 2, 2), (3, 2, 2)), ((4,), (5,))])
    first, second = FitNetsLoss([((2, 2, 2), (3, 2, 2))]), FitNetsLoss([((4,), (5,))])
    first.adapters[0].load_state_dict(two.adapters[0].state_dict())
    second.adapters[0].load_state_dict(two.adapters[1].state_dict())
    loss, _ = two([f64(S_MAP), f64(S_VEC)], [f64(T_MAP), f64(T_VEC)])
    parts = first([f64(S_MAP)], [f64(T_MAP)])[0] + second([f64(S_VEC)], [f64(T_VEC)])[0]
    assert loss.item() == pytest.approx(parts.item(), rel=1e-12)


@pytest.mark.parametrize(
    "shapes",
    [
        [((2, 4, 4), (3, 2, 2))],  # different H, W
        [((2, 4, 4), (3, 4, 5))],
        [((8,), (3, 2, 2))],  # mixed ranks
        [((2, 2, 2), (8,))],
        [((2, 2), (2, 2))],  # neither a map nor a vector
        [],
    ],
)
def test_fitnets_rejects_impossible_shapes(
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]],
) -> None:
    with pytest.raises(ValueError):
        FitNetsLoss(shapes)


def test_fitnets_rejects_features_it_was_not_built_for() -> None:
    loss = FitNetsLoss([((2, 2, 2), (3, 2, 2))])
    with pytest.raises(ValueError):
        loss([torch.zeros(3, 2, 4, 4)], [torch.zeros(3, 3, 4, 4)])
    with pytest.raises(ValueError):
        loss([torch.zeros(3, 2, 2, 2)] * 2, [torch.zeros(3, 3, 2, 2)] * 2)


@pytest.mark.parametrize(
    ("student", "teacher"),
    [
        (torch.zeros(3, 4), torch.zeros(3, 4)),  # vectors
        (torch.zeros(3, 2, 4, 4), torch.zeros(3, 2, 2, 2)),  # different H, W
        (torch.zeros(3, 2, 4, 4), torch.zeros(3, 2, 4, 5)),
        (torch.zeros(3, 2, 4, 4), torch.zeros(3, 32)),
    ],
)
def test_attention_transfer_rejects_non_matching_maps(
    student: torch.Tensor, teacher: torch.Tensor
) -> None:
    with pytest.raises(ValueError):
        AttentionTransferLoss()([student], [teacher])


@pytest.mark.parametrize(
    "criterion", [AttentionTransferLoss(), SimilarityPreservingLoss(), RKDLoss()]
)
def test_misaligned_lists_are_rejected(criterion: torch.nn.Module) -> None:
    maps = torch.ones(3, 2, 2, 2)
    for students, teachers in (([maps], []), ([], []), ([maps], [torch.ones(4, 2, 2, 2)])):
        with pytest.raises(ValueError):
            criterion(students, teachers)


def test_rkd_batch_of_one_is_finite_zero() -> None:
    student = torch.tensor([S_VEC[0]], requires_grad=True)
    loss, terms = RKDLoss()([student], [torch.tensor([T_VEC[0]])])
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert terms["rkd_distance_loss"].item() == 0.0 and terms["rkd_angle_loss"].item() == 0.0
    loss.backward()
    assert student.grad is not None and torch.all(student.grad == 0)


def test_rkd_zero_weight_skips_its_part(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object) -> torch.Tensor:
        raise AssertionError("a part with weight 0 was computed")

    s, t = [f64(S_VEC)], [f64(T_VEC)]
    monkeypatch.setattr(features, "_angles", fail)
    loss, terms = RKDLoss(25.0, 0.0)(s, t)
    assert set(terms) == {"rkd_distance_loss"}
    assert loss.item() == pytest.approx(25 * ref_rkd_distance(S_VEC, T_VEC), rel=1e-9)
    monkeypatch.undo()
    monkeypatch.setattr(features, "_normalized_distances", fail)
    loss, terms = RKDLoss(0.0, 50.0)(s, t)
    assert set(terms) == {"rkd_angle_loss"}
    assert loss.item() == pytest.approx(50 * ref_rkd_angle(S_VEC, T_VEC), rel=1e-9)


# --- FeatureKD --------------------------------------------------------------------------------

LOGITS_S = [[1.0, 2.0, 0.5], [0.2, -1.0, 3.0], [0.0, 0.5, -0.5]]
LOGITS_T = [[2.0, 1.0, -1.0], [0.0, 0.5, 4.0], [1.0, 1.0, 0.0]]
LABELS = [1, 2, 0]


def softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def ref_ce() -> float:
    return sum(-math.log(softmax(r)[y]) for r, y in zip(LOGITS_S, LABELS, strict=True)) / 3


def ref_kl(t: float) -> float:
    kls = [
        sum(p * math.log(p / q) for p, q in zip(softmax(te, t), softmax(s, t), strict=True))
        for s, te in zip(LOGITS_S, LOGITS_T, strict=True)
    ]
    return sum(kls) / 3


@pytest.mark.parametrize(("alpha", "temperature"), [(0.0, 4.0), (1.0, 4.0), (1.0, 2.0)])
def test_feature_kd_adds_the_logit_term(alpha: float, temperature: float) -> None:
    criterion = fitnets_with(W_CONV, ((2, 2, 2), (3, 2, 2)))
    loss_fn = FeatureKD(criterion, temperature=temperature, alpha=alpha)
    total_loss, terms = loss_fn(
        f64(LOGITS_S), f64(LOGITS_T), torch.tensor(LABELS), [f64(S_MAP)], [f64(T_MAP)]
    )
    logit = ref_ce() if alpha == 0 else temperature**2 * ref_kl(temperature)
    expected = logit + ref_fitnets_conv(W_CONV, S_MAP, T_MAP)
    assert total_loss.item() == pytest.approx(expected, rel=1e-9)
    assert set(terms) == {"kd_loss", "ce_loss", "fitnets_loss"}
    assert terms["ce_loss"].item() == pytest.approx(ref_ce(), rel=1e-9)


def test_feature_kd_owns_the_criterion_parameters() -> None:
    criterion = FitNetsLoss([((2, 2, 2), (3, 2, 2)), ((4,), (5,))])
    loss_fn = FeatureKD(criterion, temperature=4.0, alpha=0.0)
    params = {id(p) for p in loss_fn.parameters()}
    assert {id(a.weight) for a in criterion.adapters} <= params and len(params) == 2
    assert set(loss_fn.state_dict()) == {
        "criterion.adapters.0.weight",
        "criterion.adapters.1.weight",
    }


def test_fitnets_adapters_learn() -> None:
    """A few SGD steps on the regressors alone drive the hint loss down."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(8, 2, 4, 4, generator=generator)
    target_weight = torch.randn(3, 2, 1, 1, generator=generator)
    teacher = torch.nn.functional.conv2d(student, target_weight)  # reachable by a 1x1 regressor
    loss_fn = FitNetsLoss([((2, 4, 4), (3, 4, 4))])
    losses = []
    for _ in range(8):
        # Plain SGD by hand: torch.optim's first import costs about a second.
        loss, _ = loss_fn([student], [teacher])
        loss_fn.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in loss_fn.parameters():
                assert p.grad is not None
                p.sub_(p.grad)  # learning rate 1
        losses.append(loss.item())
    assert all(b < a for a, b in itertools.pairwise(losses))
    assert losses[-1] < 0.05 * losses[0]
