"""The model signature: how teachers, datasets and students are compared."""

import pytest
from pydantic import ValidationError

from app.ml.signature import (
    Datatype,
    ImagePreprocessing,
    ModelSignature,
    OutputKind,
    OutputSpec,
    SignatureMismatch,
    TensorSpec,
    check_compatible,
)

TEACHER = ModelSignature.for_tensor((1, 8, 8), 10)
TEXT = ModelSignature(
    inputs=[
        TensorSpec(name="input_ids", datatype=Datatype.INT64, shape=["sequence"]),
        TensorSpec(name="attention_mask", datatype=Datatype.INT64, shape=["sequence"]),
    ],
    outputs=[OutputSpec(name="logits", shape=[2], classes=["negative", "positive"])],
)


def mismatch(model: ModelSignature, data: ModelSignature) -> SignatureMismatch:
    with pytest.raises(SignatureMismatch) as raised:
        check_compatible(model, data, field="dataset")
    assert raised.value.field == "dataset"
    return raised.value


def test_the_same_inputs_and_fewer_classes_fit() -> None:
    check_compatible(TEACHER, ModelSignature.for_tensor((1, 8, 8), 10), field="dataset")
    check_compatible(TEACHER, ModelSignature.for_tensor((1, 8, 8), 7), field="dataset")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (ModelSignature.for_tensor((1, 28, 28), 10), ["[1, 28, 28]", "[1, 8, 8]"]),
        (ModelSignature.for_tensor((64,), 10), ["[64]", "[1, 8, 8]"]),
        (ModelSignature.for_tensor((1, 8, 8), 11), ["11 classes", "only 10 logits"]),
        (TEXT, ["takes 1 input(s)", "gives 2", "input_ids: INT64 ['sequence']"]),
    ],
)
def test_a_mismatch_names_both_sides(data: ModelSignature, words: list[str]) -> None:
    detail = mismatch(TEACHER, data).detail
    for word in words:
        assert word in detail


def test_symbolic_dimensions_take_any_size_but_datatypes_must_agree() -> None:
    fixed = ModelSignature(
        inputs=[
            TensorSpec(name="ids", datatype=Datatype.INT64, shape=[128]),
            TensorSpec(name="mask", datatype=Datatype.INT64, shape=[128]),
        ],
        outputs=[OutputSpec(name="labels", shape=[2])],
    )
    check_compatible(TEXT, fixed, field="dataset")
    floats = fixed.model_copy(
        update={"inputs": [TensorSpec(name="ids", shape=[128]), fixed.inputs[1]]}
    )
    assert "FP32" in mismatch(TEXT, floats).detail


def test_scores_must_be_a_class_vector_with_matching_names() -> None:
    with pytest.raises(ValidationError, match="class scores"):
        ModelSignature(
            inputs=[TensorSpec(name="x", shape=[4])],
            outputs=[OutputSpec(name="y", shape=["sequence"])],
        )
    with pytest.raises(ValidationError, match="3 scores but 2 class names"):
        ModelSignature.for_tensor((4,), 3, classes=["a", "b"])


def test_accessors_and_json_round_trip() -> None:
    signature = ModelSignature.for_tensor(
        (3, 32, 32),
        3,
        classes=["cat", "dog", "emu"],
        kind=OutputKind.PROBABILITIES,
        preprocessing=ImagePreprocessing(mean=[0.5] * 3, std=[0.25] * 3),
    )
    assert signature.input_shape == (3, 32, 32)
    assert signature.class_names == ["cat", "dog", "emu"]
    assert ModelSignature.for_tensor((4,), 2).class_names == ["0", "1"]
    assert ModelSignature.model_validate_json(signature.model_dump_json()) == signature
    with pytest.raises(SignatureMismatch, match="one input of fixed shape"):
        _ = TEXT.input_shape
