import pytest
import torch

from app.ml.architectures import (
    CnnSpec,
    MlpSpec,
    Standardize,
    build_model,
    build_student,
    parameter_count,
)


def test_standardize_fits_per_channel_statistics() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, 4, 4, generator=generator) * torch.tensor([1.0, 5.0, 0.1]).reshape(
        3, 1, 1
    ) + torch.tensor([0.0, 10.0, -2.0]).reshape(3, 1, 1)
    layer = Standardize((3, 4, 4))
    layer.fit(x)
    out = layer(x)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)


def test_standardize_flat_inputs_per_feature() -> None:
    x = torch.tensor([[1.0, 100.0], [3.0, 300.0]])
    layer = Standardize((2,))
    layer.fit(x)
    assert torch.allclose(layer.mean, torch.tensor([2.0, 200.0]))
    assert torch.allclose(layer(x).abs(), torch.full((2, 2), 2**-0.5), atol=1e-6)


def test_student_statistics_are_weights_not_parameters() -> None:
    x = torch.rand(64, 1, 8, 8)
    student = build_student(MlpSpec(hidden_sizes=[16]), (1, 8, 8), 10, fit_inputs=x)
    assert parameter_count(student) == 64 * 16 + 16 + 16 * 10 + 10
    state = student.state_dict()
    assert {"0.mean", "0.std"} <= set(state)
    rebuilt = build_student(MlpSpec(hidden_sizes=[16]), (1, 8, 8), 10)
    rebuilt.load_state_dict(state)
    assert torch.equal(rebuilt.eval()(x), student.eval()(x))


@pytest.mark.parametrize(
    ("spec", "shape", "parameters"),
    [
        (MlpSpec(hidden_sizes=[128]), (1, 28, 28), 784 * 128 + 128 + 128 * 10 + 10),
        (CnnSpec(channels=[32, 64], hidden_sizes=[512]), (1, 28, 28), 1_630_186),
        (CnnSpec(channels=[4]), (1, 1, 1), 4 * 9 + 4 * 2 + 4 * 10 + 10),
    ],
)
def test_architectures_build_and_count(
    spec: MlpSpec | CnnSpec, shape: tuple[int, ...], parameters: int
) -> None:
    model = build_model(spec, shape, 10)
    assert parameter_count(model) == parameters
    assert model(torch.zeros(2, *shape)).shape == (2, 10)
