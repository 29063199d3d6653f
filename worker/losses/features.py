"""Feature-based distillation criteria: the student matches the teacher's intermediate features.

Each criterion is called as ``criterion(student_features, teacher_features) -> (total, terms)``
with two aligned lists: pair ``j`` is ``(student_features[j], teacher_features[j])``, each tensor
batch-first, ``[B, C, H, W]`` feature maps or ``[B, D]`` vectors. The loss over several pairs is
the sum over pairs (as in the papers). Teacher features are constants: they are detached here, so
the teacher never receives gradients. The maths runs in float32 at least (bf16 features lose
precision in the squares and the norms). ``terms`` hold the unweighted sums over pairs, detached.
"""

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from worker.losses.common import Terms, upcast
from worker.losses.kd import KDLoss

Shape = tuple[int, ...]


def _pairs(
    student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Aligned ``(student, teacher)`` pairs, upcast, the teacher detached; shapes checked."""
    if not student_features or len(student_features) != len(teacher_features):
        raise ValueError(
            f"need aligned, non-empty feature lists; got {len(student_features)} student and "
            f"{len(teacher_features)} teacher tensors"
        )
    for j, (s, t) in enumerate(zip(student_features, teacher_features, strict=True)):
        if s.dim() < 2 or t.dim() < 2 or s.shape[0] != t.shape[0]:
            raise ValueError(
                f"pair {j}: features must be batch-first with the same batch size; "
                f"got {tuple(s.shape)} and {tuple(t.shape)}"
            )
        yield upcast(s), upcast(t.detach())


def _require_maps(j: int, s: torch.Tensor, t: torch.Tensor) -> None:
    if s.dim() != 4 or t.dim() != 4 or s.shape[2:] != t.shape[2:]:
        raise ValueError(
            f"pair {j}: needs [B, C, H, W] maps with equal H, W; "
            f"got {tuple(s.shape)} and {tuple(t.shape)}"
        )


class FitNetsLoss(nn.Module):
    """FitNets hints (Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets").

    A learned regressor ``r_j`` maps each student feature onto its teacher's:
    ``loss = weight * sum_j mean_{b,...} (r_j(s_j) - t_j)^2``, the mean over all elements.
    ``shapes[j] = (student_shape, teacher_shape)`` per sample, without the batch dimension:
    ``[C_s, H, W] -> [C_t, H, W]`` gets a 1x1 ``Conv2d(C_s, C_t)``, ``[D_s] -> [D_t]`` a
    ``Linear(D_s, D_t)``, both without bias; the regressor is used even when the shapes are
    equal. ``weight`` weights the hint term against whatever it is added to; the paper trains the
    hint stage on this loss alone (weight 1). The regressors are float32 parameters and run in
    the dtype of the (upcast) features.
    """

    def __init__(self, shapes: list[tuple[Shape, Shape]], weight: float = 1.0) -> None:
        super().__init__()
        if not shapes:
            raise ValueError("FitNets needs at least one (student_shape, teacher_shape) pair")
        adapters: list[nn.Module] = []
        for j, (student_shape, teacher_shape) in enumerate(shapes):
            if len(student_shape) == 3 and len(teacher_shape) == 3:
                if student_shape[1:] != teacher_shape[1:]:
                    raise ValueError(
                        f"pair {j}: a 1x1 regressor cannot map {student_shape} to "
                        f"{teacher_shape}: H, W differ"
                    )
                adapters.append(
                    nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1, bias=False)
                )
            elif len(student_shape) == 1 and len(teacher_shape) == 1:
                adapters.append(nn.Linear(student_shape[0], teacher_shape[0], bias=False))
            else:
                raise ValueError(
                    f"pair {j}: no regressor maps {student_shape} to {teacher_shape}; "
                    "both must be [C, H, W] maps or both [D] vectors"
                )
        self.shapes = [(tuple(s), tuple(t)) for s, t in shapes]
        self.adapters = nn.ModuleList(adapters)
        self.weight = weight

    def regress(self, j: int, student: torch.Tensor) -> torch.Tensor:
        """Regressor ``j`` run in the features' dtype (its float32 weight cast, not the module)."""
        adapter = self.adapters[j]
        if isinstance(adapter, nn.Conv2d):
            return F.conv2d(student, adapter.weight.to(student.dtype))
        assert isinstance(adapter, nn.Linear)
        return F.linear(student, adapter.weight.to(student.dtype))

    def forward(
        self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]
    ) -> tuple[torch.Tensor, Terms]:
        if len(student_features) != len(self.adapters):
            raise ValueError(
                f"FitNets was built for {len(self.adapters)} pairs, got {len(student_features)}"
            )
        parts = []
        for j, (s, t) in enumerate(_pairs(student_features, teacher_features)):
            student_shape, teacher_shape = self.shapes[j]
            if s.shape[1:] != student_shape or t.shape[1:] != teacher_shape:
                raise ValueError(
                    f"pair {j}: expected per-sample shapes {student_shape} and {teacher_shape}; "
                    f"got {tuple(s.shape[1:])} and {tuple(t.shape[1:])}"
                )
            parts.append(F.mse_loss(self.regress(j, s), t))
        hint = torch.stack(parts).sum()
        return self.weight * hint, {"fitnets_loss": hint.detach()}


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B, H*W]``: channel mean of squared activations, unit L2 norm per row."""
    return F.normalize(x.pow(2).mean(1).reshape(x.shape[0], -1))


class AttentionTransferLoss(nn.Module):
    """Activation-based attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More
    Attention to Attention"), as in the authors' code (github.com/szagoruyko/attention-transfer).

    ``at(x) = normalize(mean_c x^2)`` flattened to ``[B, H*W]``; per pair
    ``at_loss = mean_{b,hw} (at(s) - at(t))^2``; ``loss = weight / 2 * sum_j at_loss``.
    ``weight`` is the paper's beta (1000): it sets the transfer term against cross-entropy. Pairs
    are ``[B, C, H, W]`` maps with equal ``H, W``; the channel counts may differ.
    """

    def __init__(self, weight: float = 1000.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(
        self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]
    ) -> tuple[torch.Tensor, Terms]:
        parts = []
        for j, (s, t) in enumerate(_pairs(student_features, teacher_features)):
            _require_maps(j, s, t)
            parts.append((attention_map(s) - attention_map(t)).pow(2).mean())
        at = torch.stack(parts).sum()
        return self.weight / 2 * at, {"at_loss": at.detach()}


def _normalized_gram(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...] -> [B, B]``: the batch's similarity matrix ``Q Q^T``, rows L2-normalised."""
    q = x.reshape(x.shape[0], -1)
    return F.normalize(q @ q.T, dim=1)


class SimilarityPreservingLoss(nn.Module):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019).

    With ``Q = f.view(B, -1)`` and ``G~ = row_normalize(Q Q^T)`` (``[B, B]``), per pair
    ``sp = ||G~_t - G~_s||_F^2 / B^2``; ``loss = weight * sum_j sp``. ``weight`` is the paper's
    gamma (3000), against cross-entropy. Any per-sample shapes; student and teacher may differ.
    """

    def __init__(self, weight: float = 3000.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(
        self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]
    ) -> tuple[torch.Tensor, Terms]:
        parts = []
        for s, t in _pairs(student_features, teacher_features):
            with torch.no_grad():
                g_t = _normalized_gram(t)
            b = s.shape[0]
            parts.append((g_t - _normalized_gram(s)).pow(2).sum() / (b * b))
        sp = torch.stack(parts).sum()
        return self.weight * sp, {"sp_loss": sp.detach()}


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``[B, D] -> [B, B]`` distances ``sqrt(max(|a|^2 + |b|^2 - 2ab, eps))``, the diagonal 0.

    The clamp keeps the square root's gradient finite for coincident rows (and for the diagonal,
    which is then zeroed out of place so autograd sends it no gradient).
    """
    square = e.pow(2).sum(dim=1)
    d = (square.unsqueeze(1) + square.unsqueeze(0) - 2 * e @ e.T).clamp(min=eps).sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def _normalized_distances(e: torch.Tensor) -> torch.Tensor:
    """Distances over their mean off the diagonal. Off-diagonal entries are >= sqrt(eps) > 0, so
    this is the authors' ``d / d[d > 0].mean()`` without a data-dependent mask (a host sync)."""
    b = e.shape[0]
    d = pairwise_distances(e)
    return d / (d.sum() / (b * (b - 1)))


def _angles(e: torch.Tensor) -> torch.Tensor:
    """``[B, D] -> [B^3]``: cosines ``<unit(e_j - e_i), unit(e_k - e_i)>`` for all ``i, j, k``."""
    differences = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(differences, differences.transpose(1, 2)).reshape(-1)


class RKDLoss(nn.Module):
    """Relational KD (Park et al., CVPR 2019), as in the authors' code (github.com/lenscloth/RKD).

    Features are flattened to ``[B, D]``. Distance: ``psi_D = d / mean(d_{i != j})`` with ``d`` the
    pairwise Euclidean distances; angle: ``psi_A = <unit(e_j - e_i), unit(e_k - e_i)>`` over all
    triplets. Per pair, each term is a Huber (smooth L1, beta 1) loss averaged over the entries
    (``B^2`` and ``B^3``): ``loss = distance_weight * sum_j l_D + angle_weight * sum_j l_A``. The
    weights are the paper's lambda_D = 25 and lambda_A = 50, against the task loss. A weight of 0
    skips its part (the angle term holds ``B^2 D`` values) and leaves its term out. A batch of one
    has no distances: its distance loss is 0 (its angles are all 0, so the angle loss is 0 too).
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(
        self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]
    ) -> tuple[torch.Tensor, Terms]:
        distances: list[torch.Tensor] = []
        angles: list[torch.Tensor] = []
        for s_full, t_full in _pairs(student_features, teacher_features):
            b = s_full.shape[0]
            s, t = s_full.reshape(b, -1), t_full.reshape(b, -1)
            if self.distance_weight != 0:
                if b < 2:
                    # No pairs to compare; a zero that keeps the graph, so backward() still runs.
                    distances.append(s.sum() * 0.0)
                else:
                    with torch.no_grad():
                        d_t = _normalized_distances(t)
                    distances.append(F.smooth_l1_loss(_normalized_distances(s), d_t))
            if self.angle_weight != 0:
                with torch.no_grad():
                    a_t = _angles(t)
                angles.append(F.smooth_l1_loss(_angles(s), a_t))
        weighted: list[torch.Tensor] = []
        terms: Terms = {}
        if distances:
            distance = torch.stack(distances).sum()
            weighted.append(self.distance_weight * distance)
            terms["rkd_distance_loss"] = distance.detach()
        if angles:
            angle = torch.stack(angles).sum()
            weighted.append(self.angle_weight * angle)
            terms["rkd_angle_loss"] = angle.detach()
        total = torch.stack(weighted).sum() if weighted else torch.zeros(())
        return total, terms


class FeatureKD(nn.Module):
    """A logit term plus a feature criterion: ``KDLoss(T, alpha)(s, t, y) + criterion(f_s, f_t)``.

    ``KDLoss`` is ``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE``; ``alpha = 0`` gives the plain
    cross-entropy the feature papers add their term to. Logits ``[B, C]``, labels ``[B]`` (int64),
    features as the criterion takes them. The criterion is a submodule, so its parameters (the
    FitNets regressors) are in ``parameters()`` and ``state_dict()``.
    """

    def __init__(self, criterion: nn.Module, temperature: float, alpha: float) -> None:
        super().__init__()
        self.logit_loss = KDLoss(temperature, alpha)
        self.criterion = criterion

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        student_features: list[torch.Tensor],
        teacher_features: list[torch.Tensor],
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Terms]:
        """``mask`` ``[B, L]``: text records' real tokens, for a criterion over tokens."""
        logit_total, logit_terms = self.logit_loss(student_logits, teacher_logits, labels)
        masked = () if mask is None else (mask,)
        feature_total, feature_terms = self.criterion(student_features, teacher_features, *masked)
        return logit_total + feature_total, {**logit_terms, **feature_terms}
