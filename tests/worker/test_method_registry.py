"""The contract between the method configs a job spec names and the worker's losses: one loss
per method, each building from its defaults, taking shapes exactly when it is a feature method."""

import inspect
import typing

import pytest
import torch

from app.jobs.methods import DistillationMethod, MethodConfig, MethodKind
from worker.losses import (
    FEATURE_LOSSES,
    LOSSES,
    FeatureShapes,
    build_loss,
    register,
    register_feature,
)

(UNION, _) = typing.get_args(DistillationMethod)
METHODS: tuple[type[MethodConfig], ...] = typing.get_args(UNION)
SHAPES: FeatureShapes = [((2, 3, 3), (4, 3, 3))]
KINDS = {
    "kd": MethodKind.LOGIT,
    "mse": MethodKind.LOGIT,
    "dkd": MethodKind.LOGIT,
    "dist": MethodKind.LOGIT,
    "ls_kd": MethodKind.LOGIT,
    "forward_kl": MethodKind.SEQUENCE,
    "reverse_kl": MethodKind.SEQUENCE,
    "jsd": MethodKind.SEQUENCE,
    "fitnets": MethodKind.FEATURE,
    "at": MethodKind.FEATURE,
    "sp": MethodKind.FEATURE,
    "rkd": MethodKind.FEATURE,
    "hidden_states": MethodKind.FEATURE,
    "attention_kl": MethodKind.FEATURE,
}
# Text methods match per-token layers of a transformer: hidden states [B, L, D] and attention
# distributions [B, heads, L, L], over the records' real tokens (a mask [B, L]).
TEXT_METHODS = {"hidden_states", "attention_kl"}


def name(cls: type[MethodConfig]) -> str:
    (literal,) = typing.get_args(cls.model_fields["method"].annotation)
    return str(literal)


def default(cls: type[MethodConfig]) -> MethodConfig:
    return cls.model_validate({"method": name(cls)})


def test_every_method_has_exactly_one_loss_and_every_loss_a_method() -> None:
    assert len(set(METHODS)) == len(METHODS) == len(KINDS)
    assert not LOSSES.keys() & FEATURE_LOSSES.keys()
    assert set(METHODS) == LOSSES.keys() | FEATURE_LOSSES.keys()


@pytest.mark.parametrize("cls", METHODS, ids=name)
def test_kind_says_whether_the_loss_needs_feature_shapes(cls: type[MethodConfig]) -> None:
    assert cls.kind is KINDS[name(cls)]
    feature = cls.kind is MethodKind.FEATURE
    assert (cls in FEATURE_LOSSES) is feature
    builder = FEATURE_LOSSES[cls] if feature else LOSSES[cls]
    assert len(inspect.signature(builder).parameters) == (2 if feature else 1)
    with pytest.raises(TypeError, match=cls.__name__):
        (register if feature else register_feature)(cls)
    if feature:
        with pytest.raises(ValueError, match="shapes"):
            build_loss(default(cls))


@pytest.mark.parametrize("cls", METHODS, ids=name)
def test_each_default_builds_and_gives_a_finite_scalar(cls: type[MethodConfig]) -> None:
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    if name(cls) in TEXT_METHODS:
        mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
        if name(cls) == "hidden_states":
            features = [torch.randn(4, 3, 2)], [torch.randn(4, 3, 6)]
        else:
            features = (
                [torch.softmax(torch.randn(4, 2, 3, 3), -1)],
                [torch.softmax(torch.randn(4, 2, 3, 3), -1)],
            )
        loss = build_loss(default(cls), [((2,), (6,))])
        total, terms = loss(s, t, y, *features, mask)
    elif cls.kind is MethodKind.FEATURE:
        features = [torch.randn(4, 2, 3, 3)], [torch.randn(4, 4, 3, 3)]
        total, terms = build_loss(default(cls), SHAPES)(s, t, y, *features)
    else:
        total, terms = build_loss(default(cls))(s, t, y)
    assert total.dim() == 0 and torch.isfinite(total) and total.item() >= 0
    assert terms and all(torch.isfinite(v) for v in terms.values())


@pytest.mark.parametrize("cls", METHODS, ids=name)
def test_teachers_are_mixed_at_the_method_temperature(cls: type[MethodConfig]) -> None:
    config = default(cls)
    if "temperature" not in cls.model_fields:
        assert config.teacher_temperature == 1.0
        return
    assert config.teacher_temperature == getattr(config, "temperature")  # noqa: B009
    warmer = cls.model_validate({"method": name(cls), "temperature": 7.5})
    assert warmer.teacher_temperature == 7.5
