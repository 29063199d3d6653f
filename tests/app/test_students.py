import pytest
import torch
from pydantic import BaseModel, ValidationError

from app.ml.signature import Datatype, ModelSignature, TensorSpec, TextPreprocessing
from app.ml.students import (
    FAMILIES,
    CnnSpec,
    MlpSpec,
    Standardize,
    StudentSpec,
    build_model,
    build_student,
    family_of,
    parameter_count,
    parse_spec,
)
from app.ml.text import text_model_signature

DIGITS = ModelSignature.for_tensor((1, 8, 8), 10)
TEXT = text_model_signature(10, preprocessing=TextPreprocessing(max_length=16), token_type_ids=True)
# A Hugging Face teacher's config, as a text student resolves its spec from it.
TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 50,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
    "type_vocab_size": 2,
    "pad_token_id": 0,
}


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
    # The population std: (x - mean) / std is exactly +-1 for two samples.
    assert torch.allclose(layer(x).abs(), torch.ones(2, 2), atol=1e-6)


def test_standardize_gives_constant_features_scale_one() -> None:
    """A feature that never varied (zero throughout, as three digits pixels are) keeps scale 1,
    so a faint served value there moves the input by that value, not by value / 1e-6."""
    x = torch.tensor([[0.0, 1.0, 5.0], [0.0, 3.0, 5.0], [0.0, 5.0, 5.0]])
    layer = Standardize((3,))
    layer.fit(x)
    assert torch.allclose(layer.std, torch.tensor([1.0, (8 / 3) ** 0.5, 1.0]))
    assert layer(torch.tensor([[1 / 16, 3.0, 5.0]])).tolist() == [[1 / 16, 0.0, 0.0]]


def test_standardize_fits_one_sample() -> None:
    layer = Standardize((2,))
    layer.fit(torch.tensor([[2.0, -1.0]]))
    assert layer.mean.tolist() == [2.0, -1.0]
    assert layer.std.tolist() == [1.0, 1.0]
    assert torch.isfinite(layer(torch.tensor([[3.0, 0.0]]))).all()


def test_student_statistics_are_weights_not_parameters() -> None:
    x = torch.rand(64, 1, 8, 8)
    student = build_student(MlpSpec(hidden_sizes=[16]), DIGITS, fit_inputs=x)
    assert parameter_count(student) == 64 * 16 + 16 + 16 * 10 + 10
    state = student.state_dict()
    assert {"0.mean", "0.std"} <= set(state)
    rebuilt = build_student(MlpSpec(hidden_sizes=[16]), DIGITS)
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
    model = build_model(spec, ModelSignature.for_tensor(shape, 10))
    assert parameter_count(model) == parameters
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


class Job(BaseModel):
    student: StudentSpec


def test_the_spec_union_is_the_registry() -> None:
    """Contract: each registered family parses as itself through the public union, and nothing
    else parses."""
    for name, family in FAMILIES.items():
        assert family.name == name
        assert family.spec.model_fields["architecture"].default == name
        parsed = Job.model_validate({"student": {"architecture": name}}).student
        assert type(parsed) is family.spec
        assert family_of(parsed) is family
        assert parse_spec(parsed.model_dump()) == parsed
        text = family.accepts(DIGITS) is not None
        assert family.accepts(TEXT if text else DIGITS) is None
        if family.resolve is not None:
            parsed = family.resolve(parsed, TINY_BERT)
            assert parse_spec(parsed.model_dump()) == parsed
        model = family.apply_memory_format(build_model(parsed, TEXT if text else DIGITS))
        ids = torch.ones(2, 7, dtype=torch.int64)
        inputs = (ids, ids, torch.zeros_like(ids)) if text else (torch.zeros(2, 1, 8, 8),)
        assert model(*inputs).shape == (2, 10)
    with pytest.raises(ValidationError):
        Job.model_validate({"student": {"architecture": "lstm"}})


def test_families_say_which_signatures_they_cannot_take() -> None:
    flat = ModelSignature.for_tensor((64,), 10)
    tokens = ModelSignature(
        inputs=[TensorSpec(name="input_ids", datatype=Datatype.INT64, shape=["sequence"])],
        outputs=DIGITS.outputs,
    )
    assert FAMILIES["mlp"].accepts(flat) is None
    assert "[C, H, W]" in (FAMILIES["cnn"].accepts(flat) or "")
    for name in ("mlp", "cnn"):
        assert "FP32" in (FAMILIES[name].accepts(tokens) or "")
    for name in ("transformer", "text_cnn"):
        assert "text" in (FAMILIES[name].accepts(flat) or "")
        assert FAMILIES[name].accepts(TEXT) is None
    assert FAMILIES["cnn"].memory_format == "channels_last"
