"""The ONNX teacher builder in tests/helpers/onnx_teachers.py agrees with its numpy reference."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.helpers.onnx_teachers import (
    MlpWeights,
    TeacherOptions,
    centroid_teacher,
    fit_mlp,
    reference_features,
    reference_scores,
    write_onnx_teacher,
)

INPUT_SHAPE = (1, 4, 3)
NUM_CLASSES = 5


def random_weights(seed: int = 0, hidden: int = 16) -> MlpWeights:
    """Random weights for a [1, 4, 3] input and 5 classes."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(INPUT_SHAPE))
    return MlpWeights(
        w1=rng.normal(0, 0.5, (d, hidden)).astype(np.float32),
        b1=rng.normal(0, 0.1, hidden).astype(np.float32),
        w2=rng.normal(0, 0.5, (hidden, NUM_CLASSES)).astype(np.float32),
        b2=rng.normal(0, 0.1, NUM_CLASSES).astype(np.float32),
    )


def run(path: Path, x: np.ndarray) -> tuple[ort.InferenceSession, dict[str, np.ndarray]]:
    """Run the model at path on x (cast to the declared input type); outputs by name."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    declared = session.get_inputs()[0]
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(
        declared.type, np.float64
    )
    names = [output.name for output in session.get_outputs()]
    values = session.run(None, {declared.name: x.astype(dtype)})
    return session, dict(zip(names, values, strict=True))


def assert_scores_match(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal NaN and ±inf positions; the finite entries allclose."""
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-4, atol=1e-5)


CASES: list[TeacherOptions] = [
    {},
    {"head": "probabilities"},
    {"head": "log_probabilities"},
    {"features": "first"},
    {"features": "last", "head": "log_probabilities", "features_name": "embedding"},
    {"input_dtype": "float16"},
    {"input_dtype": "float64", "head": "probabilities"},
    {"input_scale": 1 / 255},
    {"batch": 1},
    {"non_finite": "nan_rows"},
    {"non_finite": "nan_rows", "head": "probabilities", "nan_threshold": 0.5},
    {"non_finite": "neg_inf_entries", "head": "log_probabilities"},
    {"non_finite": "neg_inf_entries", "head": "logits", "features": "last"},
    {"non_finite": "neg_inf_entries", "head": "probabilities"},
    {"opset": 18, "non_finite": "neg_inf_entries", "head": "log_probabilities"},
    {"opset": 13, "scores_name": "output", "input_name": "pixels"},
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_graph_matches_reference(tmp_path: Path, options: TeacherOptions) -> None:
    weights = random_weights()
    batch = options.get("batch")
    x = np.random.default_rng(1).normal(size=(batch or 12, *INPUT_SHAPE)).astype(np.float32)
    if options.get("input_scale", 1.0) != 1.0:
        x = np.round((x + 3) * 40)  # pixel-like values that the graph rescales
    path = tmp_path / "teacher.onnx"
    write_onnx_teacher(weights, INPUT_SHAPE, path, **options)
    session, outputs = run(path, x)

    scores_name = options.get("scores_name", "logits")
    features_name = options.get("features_name", "features")
    features = options.get("features", "none")
    expected_names = {
        "none": [scores_name],
        "first": [features_name, scores_name],
        "last": [scores_name, features_name],
    }[features]
    assert list(outputs) == expected_names
    assert session.get_inputs()[0].name == options.get("input_name", "input")
    assert session.get_inputs()[0].shape == [batch or "batch", *INPUT_SHAPE]

    expected = reference_scores(weights, x, **options)
    assert expected.shape == (len(x), NUM_CLASSES)
    assert_scores_match(outputs[scores_name], expected)
    if features != "none":
        np.testing.assert_allclose(
            outputs[features_name],
            reference_features(
                weights,
                x,
                input_dtype=options.get("input_dtype", "float32"),
                input_scale=options.get("input_scale", 1.0),
            ),
            rtol=1e-4,
            atol=1e-5,
        )

    non_finite = options.get("non_finite", "none")
    if non_finite == "none":
        assert np.isfinite(expected).all()
    elif non_finite == "nan_rows":
        nan_rows = x.reshape(len(x), -1)[:, 0] > options.get("nan_threshold", 0.0)
        assert 0 < nan_rows.sum() < len(x)
        np.testing.assert_array_equal(np.isnan(expected).all(axis=1), nan_rows)
        assert np.isfinite(expected[~nan_rows]).all()
    else:
        logits = weights.logits(x)
        at_min = logits == logits.min(axis=1, keepdims=True)
        marked = expected == 0 if options.get("head") == "probabilities" else np.isneginf(expected)
        np.testing.assert_array_equal(marked, at_min)
        assert (expected.argmax(axis=1) == logits.argmax(axis=1)).all()
    if options.get("head") == "probabilities":
        rows = ~np.isnan(expected).any(axis=1)
        np.testing.assert_allclose(outputs[scores_name][rows].sum(axis=1), 1.0, rtol=1e-5)


def test_fixed_batch_and_ir_version(tmp_path: Path) -> None:
    path = tmp_path / "teacher.onnx"
    write_onnx_teacher(random_weights(), INPUT_SHAPE, path, batch=1, features="last")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 1
    assert [o.shape for o in session.get_outputs()] == [[1, NUM_CLASSES], [1, 16]]
    model = onnx.load(str(path))
    assert model.ir_version == 8 and model.opset_import[0].version == 17


def test_input_scale_is_applied_before_the_weights(tmp_path: Path) -> None:
    weights = random_weights()
    x = np.random.default_rng(2).integers(0, 256, (6, *INPUT_SHAPE)).astype(np.float32)
    path = tmp_path / "teacher.onnx"
    write_onnx_teacher(weights, INPUT_SHAPE, path, input_scale=1 / 255)
    _, outputs = run(path, x)
    np.testing.assert_allclose(outputs["logits"], weights.logits(x / 255), rtol=1e-4, atol=1e-5)


def test_centroid_teacher_is_exact_nearest_centroid(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    centroids = rng.normal(size=(NUM_CLASSES, *INPUT_SHAPE)).astype(np.float32)
    teacher = centroid_teacher(centroids)
    assert teacher.hidden_size == 2 * int(np.prod(INPUT_SHAPE))
    x = rng.normal(size=(200, *INPUT_SHAPE)).astype(np.float32)
    distances = ((x[:, None] - centroids[None]) ** 2).reshape(200, NUM_CLASSES, -1).sum(-1)
    flat = x.reshape(200, -1)
    np.testing.assert_allclose(
        teacher.logits(x), (flat**2).sum(1, keepdims=True) - distances, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(teacher.hidden(x)[:, : flat.shape[1]], np.maximum(flat, 0))
    path = tmp_path / "teacher.onnx"
    write_onnx_teacher(teacher, INPUT_SHAPE, path, head="probabilities")
    _, outputs = run(path, x)
    assert (outputs["logits"].argmax(1) == distances.argmin(1)).all()


def test_fit_mlp_learns_a_separable_problem(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    centers = rng.normal(0, 3, (NUM_CLASSES, *INPUT_SHAPE)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, 300)
    x = (centers[y] + rng.normal(size=(300, *INPUT_SHAPE))).astype(np.float32)
    weights = fit_mlp(x, y, NUM_CLASSES, hidden=16, steps=200)
    assert (weights.logits(x).argmax(1) == y).mean() > 0.9
    path = tmp_path / "teacher.onnx"
    write_onnx_teacher(weights, INPUT_SHAPE, path)
    _, outputs = run(path, x)
    np.testing.assert_allclose(outputs["logits"], weights.logits(x), rtol=1e-4, atol=1e-4)


def test_bad_shapes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="flatten"):
        write_onnx_teacher(random_weights(), (1, 5, 3), tmp_path / "teacher.onnx")
    with pytest.raises(ValueError, match="inconsistent"):
        MlpWeights(np.zeros((4, 3)), np.zeros(2), np.zeros((3, 2)), np.zeros(2))
