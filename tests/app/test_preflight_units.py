"""Unit tests of the preflight's parts and of what it leans on, on hand-computed values.

Covers ``app.jobs.preflight`` (kind detection, non-finite rows, label maps, scores settling,
teacher inputs, the below-chance refusal), ``as_logits``, ``with_scores``,
``apply_declarations`` and ``TeacherBackend._batched`` (``app.ml.teacher_formats.base``),
``Standardize`` (``app.ml.students.base``) and the worker loop's divergence check
(``worker.recipe._LoopCallbacks``). Expected numbers are written out, not recomputed with the
code under test.
"""

import math

import numpy as np
import pytest
import torch

from app.datasets.arrays import DatasetArrays
from app.errors import InvalidModel, PreflightFailed
from app.jobs.preflight import (
    _below_chance,
    detect_kind,
    label_map,
    non_finite_rows,
    refuse_non_finite,
    settle_scores,
    teacher_inputs,
)
from app.ml.layers import FeatureLayer
from app.ml.signature import (
    ImagePreprocessing,
    ModelSignature,
    OutputKind,
    OutputSpec,
    RawTensors,
    TensorSpec,
)
from app.ml.students.base import Standardize
from app.ml.teacher_formats.base import (
    ScoresChoice,
    TeacherBackend,
    TeacherDeclarations,
    TeacherInfo,
    apply_declarations,
    as_logits,
    with_scores,
)
from worker.recipe import JobFailure, SilentEvents, _LoopCallbacks

# ln(np.finfo(np.float32).tiny) = ln(2**-126) = -126 ln 2.
LOG_TINY = -87.3365447505531
LOG_0_7 = -0.35667494393873238
LOG_0_5 = -0.6931471805599453
LOG_0_2 = -1.6094379124341003
LOG_0_1 = -2.3025850929940457
TINY = 1.1754943508222875e-38  # np.finfo(np.float32).tiny


def softmax32(logits: np.ndarray) -> np.ndarray:
    """A float32 softmax, as the losses take it (torch)."""
    result: np.ndarray = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    return result


# --- as_logits ------------------------------------------------------------------------------


def test_log_tiny_constant_is_right() -> None:
    assert math.log(TINY) == pytest.approx(LOG_TINY, abs=1e-12)
    assert float(np.finfo(np.float32).tiny) == TINY


def test_as_logits_probabilities_with_a_zero() -> None:
    scores = np.array([[0.7, 0.2, 0.1, 0.0]], np.float32)
    logits = as_logits(scores, OutputKind.PROBABILITIES)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    # The zero becomes the row's maximum (log 0.7) plus log(tiny).
    expected = [LOG_0_7, LOG_0_2, LOG_0_1, LOG_0_7 + LOG_TINY]
    np.testing.assert_allclose(logits[0], expected, rtol=1e-6)
    assert logits[0, 3] == pytest.approx(-87.69321969449183, rel=1e-6)
    # The input is left alone.
    np.testing.assert_array_equal(scores, np.array([[0.7, 0.2, 0.1, 0.0]], np.float32))


def test_as_logits_softmax_gives_the_probabilities_back() -> None:
    scores = np.array([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.5, 0.0]], np.float32)
    probabilities = softmax32(as_logits(scores, OutputKind.PROBABILITIES))
    np.testing.assert_allclose(probabilities, scores, rtol=0, atol=1e-7)
    # The zero comes back at most tiny (a float32 subnormal).
    assert probabilities[0, 3] <= TINY
    assert probabilities[1, 3] <= TINY


def test_as_logits_zero_probability_softmaxes_below_float32_tiny() -> None:
    """The floor is the row maximum plus log(tiny): its softmax is tiny / (row sum of exps)."""
    scores = np.array([[0.7, 0.2, 0.1, 0.0]], np.float32)
    probabilities = softmax32(as_logits(scores, OutputKind.PROBABILITIES))
    assert 0.0 <= probabilities[0, 3] <= TINY


def test_as_logits_float64_probabilities_become_float32() -> None:
    scores = np.array([[0.5, 0.5]], np.float64)
    logits = as_logits(scores, OutputKind.PROBABILITIES)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, [[LOG_0_5, LOG_0_5]], rtol=1e-6)


def test_as_logits_log_probabilities_with_minus_inf() -> None:
    scores = np.array([[LOG_0_5, LOG_0_5, -np.inf], [LOG_0_7, LOG_0_2, LOG_0_1]], np.float32)
    logits = as_logits(scores, OutputKind.LOG_PROBABILITIES)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(
        logits,
        [[LOG_0_5, LOG_0_5, -88.02969193111305], [LOG_0_7, LOG_0_2, LOG_0_1]],
        rtol=1e-6,
    )
    np.testing.assert_allclose(softmax32(logits), [[0.5, 0.5, 0.0], [0.7, 0.2, 0.1]], atol=1e-7)


def test_as_logits_logits_floor_is_row_relative() -> None:
    scores = np.array([[1000.0, 999.0, -np.inf], [-5.0, -np.inf, -6.0]], np.float32)
    logits = as_logits(scores, OutputKind.LOGITS)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert logits[0].tolist() == pytest.approx([1000.0, 999.0, 912.6634552494469], rel=1e-6)
    assert logits[1].tolist() == pytest.approx([-5.0, -92.3365447505531, -6.0], rel=1e-6)
    # Logits are copied: the caller's array keeps its -inf.
    assert np.isneginf(scores[0, 2])


def test_as_logits_rows_of_nothing_but_zero_probability() -> None:
    logits = as_logits(np.array([[-np.inf, -np.inf]], np.float32), OutputKind.LOG_PROBABILITIES)
    assert logits[0].tolist() == pytest.approx([LOG_TINY, LOG_TINY], rel=1e-6)
    logits = as_logits(np.array([[0.0, 0.0]], np.float32), OutputKind.PROBABILITIES)
    assert logits[0].tolist() == pytest.approx([LOG_TINY, LOG_TINY], rel=1e-6)


def test_as_logits_leaves_nan_and_plus_inf() -> None:
    scores = np.array([[np.nan, 1.0, 2.0], [np.inf, 0.0, -np.inf]], np.float32)
    logits = as_logits(scores, OutputKind.LOGITS)
    assert logits.dtype == np.float32
    assert np.isnan(logits[0, 0])
    assert logits[0, 1:].tolist() == [1.0, 2.0]
    assert np.isposinf(logits[1, 0])
    assert logits[1, 1] == 0.0
    # The row's maximum is +inf: the floor falls back to log(tiny) itself.
    assert logits[1, 2] == pytest.approx(LOG_TINY, rel=1e-6)
    probabilities = np.array([[np.nan, 0.5, 0.5]], np.float32)
    assert np.isnan(as_logits(probabilities, OutputKind.PROBABILITIES)[0, 0])


# --- detect_kind ----------------------------------------------------------------------------


SOFTMAX_ROWS = [[0.7, 0.2, 0.1], [0.25, 0.25, 0.5], [1.0, 0.0, 0.0]]


def test_detect_kind_probabilities() -> None:
    assert detect_kind(np.array(SOFTMAX_ROWS, np.float32)) is OutputKind.PROBABILITIES


def test_detect_kind_log_probabilities() -> None:
    rows = [[LOG_0_7, LOG_0_2, LOG_0_1], [LOG_0_5, LOG_0_5, -np.inf]]
    assert detect_kind(np.array(rows[:1], np.float32)) is OutputKind.LOG_PROBABILITIES
    assert detect_kind(np.array(rows, np.float32)) is OutputKind.LOG_PROBABILITIES
    assert detect_kind(np.array([[0.0, -np.inf, -np.inf]], np.float32)) is (
        OutputKind.LOG_PROBABILITIES
    )


def test_detect_kind_logits() -> None:
    # Mixed signs.
    assert detect_kind(np.array([[2.0, -1.0, 0.5]], np.float32)) is OutputKind.LOGITS
    # All positive, rows summing to 3.5 and 6: not probabilities.
    positive = np.array([[2.0, 1.0, 0.5], [1.0, 2.0, 3.0]], np.float32)
    assert detect_kind(positive) is OutputKind.LOGITS
    # All negative, logsumexp -1 + ln(1 + e^-1 + e^-2) = -0.5924: not log-probabilities.
    negative = np.array([[-1.0, -2.0, -3.0]], np.float32)
    assert detect_kind(negative) is OutputKind.LOGITS
    # Logits with a -inf (a masked class) and a peak above 0.
    assert detect_kind(np.array([[3.0, 1.0, -np.inf]], np.float32)) is OutputKind.LOGITS


def test_detect_kind_float16_softmax_over_1000_classes() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 3.0, (64, 1000))
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    rounded = p.astype(np.float16).astype(np.float32)
    assert not np.array_equal(rounded.sum(-1), np.ones(64, np.float32))  # rounding did drift
    assert detect_kind(rounded) is OutputKind.PROBABILITIES
    log_rounded = np.log(p).astype(np.float16).astype(np.float32)
    assert detect_kind(log_rounded) is OutputKind.LOG_PROBABILITIES


def test_detect_kind_two_classes() -> None:
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7]], np.float32)
    assert detect_kind(probabilities) is OutputKind.PROBABILITIES
    log_probabilities = np.array([[-0.10536051565782628, -2.3025850929940457]], np.float32)
    assert detect_kind(log_probabilities) is OutputKind.LOG_PROBABILITIES
    assert detect_kind(np.array([[3.0, -1.0], [0.2, 0.4]], np.float32)) is OutputKind.LOGITS


# --- non-finite rows ------------------------------------------------------------------------


def test_non_finite_rows() -> None:
    scores = np.array(
        [
            [np.nan, 0.0, 1.0],
            [np.inf, 0.0, 1.0],
            [-np.inf, -np.inf, -np.inf],
            [-np.inf, 0.0, 1.0],
            [0.0, 1.0, 2.0],
            [-np.inf, np.inf, 0.0],
        ],
        np.float32,
    )
    assert non_finite_rows(scores).tolist() == [True, True, True, False, False, True]


def test_refuse_non_finite_names_count_and_first_indices() -> None:
    scores = np.zeros((10, 3), np.float32)
    for row in (1, 3, 4, 6, 7, 9):
        scores[row, row % 3] = np.nan
    scores[2, 0] = -np.inf  # a probability of zero: usable
    with pytest.raises(PreflightFailed) as caught:
        refuse_non_finite(scores, "t1", "sampled samples")
    error = caught.value
    assert error.code == "teacher_non_finite"
    assert error.extra["samples"] == 6
    assert "6 of 10 sampled samples" in error.detail
    assert "[1, 3, 4, 6, 7]" in error.detail and error.extra["rows"] == [1, 3, 4, 6, 7]
    assert "Teacher t1" in error.detail


def test_refuse_non_finite_passes_usable_scores() -> None:
    refuse_non_finite(np.array([[0.0, -np.inf], [1.0, 2.0]], np.float32), "t1", "samples")


# --- label_map ------------------------------------------------------------------------------


def dataset(classes: list[str]) -> DatasetArrays:
    n = len(classes)
    x = np.zeros((2 * n, 4), np.float32)
    y = np.arange(2 * n, dtype=np.int64) % n
    return DatasetArrays(x_train=x, y_train=y, x_test=x, y_test=y, classes=classes)


def teacher(classes: list[str] | None, num_classes: int = 3) -> ModelSignature:
    return ModelSignature.for_tensor((4,), num_classes, classes=classes)


def test_label_map_identity_cases() -> None:
    animals = ["cat", "dog", "bird"]
    assert label_map(dataset(animals), teacher(None)) is None
    assert label_map(dataset(["0", "1", "2"]), teacher(animals)) is None
    assert label_map(dataset(animals), teacher(animals)) is None
    assert label_map(dataset(["cat", "dog"]), teacher(animals)) is None


def test_label_map_permutation() -> None:
    animals = ["cat", "dog", "bird"]
    assert label_map(dataset(["dog", "bird", "cat"]), teacher(animals)) == [1, 2, 0]
    assert label_map(dataset(["bird", "cat"]), teacher(animals)) == [2, 0]


def test_label_map_missing_name() -> None:
    with pytest.raises(PreflightFailed) as caught:
        label_map(dataset(["cat", "fish"]), teacher(["cat", "dog", "bird"]))
    assert caught.value.code == "class_names_mismatch"
    assert caught.value.extra["field"] == "dataset"
    assert "'fish'" in caught.value.detail


# --- settle_scores and with_scores ----------------------------------------------------------


def two_outputs(first: int = 32, second: int = 10) -> ModelSignature:
    return ModelSignature(
        inputs=[TensorSpec(name="input", shape=[4])],
        outputs=[
            OutputSpec(name="output_0", shape=[first]),
            OutputSpec(name="output_1", shape=[second]),
        ],
    )


POSITION = ScoresChoice(output="output_0", by="position")


def test_settle_scores_takes_the_output_of_class_width() -> None:
    layers = [FeatureLayer(name="output_1", shape=[10])]
    signature, new_layers, choice = settle_scores(two_outputs(), layers, POSITION, 10)
    assert [o.name for o in signature.outputs] == ["output_1", "output_0"]
    assert signature.scores.shape == [10]
    assert new_layers == [FeatureLayer(name="output_0", shape=[32])]
    assert choice == ScoresChoice(output="output_1", by="classes", kind_by="assumed")


def test_settle_scores_keeps_kind_by() -> None:
    declared = ScoresChoice(output="output_0", by="position", kind_by="declared")
    _, _, choice = settle_scores(two_outputs(), [], declared, 10)
    assert choice == ScoresChoice(output="output_1", by="classes", kind_by="declared")


@pytest.mark.parametrize(
    ("first", "second", "num_classes"),
    [(32, 10, 7), (10, 10, 10)],
    ids=["no-width-match", "two-width-matches"],
)
def test_settle_scores_unchanged_without_one_match(
    first: int, second: int, num_classes: int
) -> None:
    signature = two_outputs(first, second)
    layers = [FeatureLayer(name="output_1", shape=[second])]
    result = settle_scores(signature, layers, POSITION, num_classes)
    assert result[0] is signature
    assert result[1] is layers
    assert result[2] is POSITION


def test_settle_scores_unchanged_when_chosen_by_name() -> None:
    signature = two_outputs()
    layers = [FeatureLayer(name="output_1", shape=[10])]
    by_name = ScoresChoice(output="output_0", by="name")
    result = settle_scores(signature, layers, by_name, 10)
    assert result == (signature, layers, by_name)
    assert result[0] is signature


def test_with_scores_does_not_duplicate_a_layer() -> None:
    layers = [
        FeatureLayer(name="output_0", shape=[32], kind="Gemm"),
        FeatureLayer(name="output_1", shape=[10]),
    ]
    signature, new_layers = with_scores(two_outputs(), layers, "output_1")
    assert [o.name for o in signature.outputs] == ["output_1", "output_0"]
    assert new_layers == [FeatureLayer(name="output_0", shape=[32], kind="Gemm")]


def test_with_scores_on_the_current_scores_changes_nothing() -> None:
    signature = two_outputs()
    layers = [FeatureLayer(name="output_1", shape=[10])]
    new_signature, new_layers = with_scores(signature, layers, "output_0")
    assert new_signature == signature
    assert new_layers == layers


# --- teacher_inputs -------------------------------------------------------------------------


def test_teacher_inputs_scale_on_raw_pixels() -> None:
    x = np.array([[[[0.0, 255.0], [51.0, 102.0]]]], np.float32)
    result = teacher_inputs(x, RawTensors(), ImagePreprocessing(scale=1 / 255))
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, [[[[0.0, 1.0], [0.2, 0.4]]]], rtol=1e-6, atol=1e-7)


def test_teacher_inputs_mean_and_std_per_channel() -> None:
    first = [
        [[0.0, 255.0], [51.0, 102.0]],
        [[255.0, 0.0], [0.0, 255.0]],
        [[255.0, 51.0], [102.0, 153.0]],
    ]
    x = np.array([first, 255.0 - np.array(first)], np.float32)
    assert x.shape == (2, 3, 2, 2)
    preprocessing = ImagePreprocessing(scale=1 / 255, mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 2.0])
    result = teacher_inputs(x, RawTensors(), preprocessing)
    assert result.dtype == np.float32
    assert result.shape == (2, 3, 2, 2)
    expected = [
        [
            [[-1.0, 1.0], [-0.6, -0.2]],
            [[3.0, -1.0], [-1.0, 3.0]],
            [[0.5, 0.1], [0.2, 0.3]],
        ],
        [
            [[1.0, -1.0], [0.6, 0.2]],
            [[-1.0, 3.0], [3.0, -1.0]],
            [[0.0, 0.4], [0.3, 0.2]],
        ],
    ]
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_teacher_inputs_undoes_the_data_preprocessing() -> None:
    # Stored as pixels / 16; the teacher takes (pixels / 255 - 0.5) / 0.25.
    pixels = np.array([[[[0.0, 16.0], [64.0, 255.0]]]], np.float32)
    x = pixels / np.float32(16)
    np.testing.assert_array_equal(x, [[[[0.0, 1.0], [4.0, 15.9375]]]])
    data = ImagePreprocessing(scale=1 / 16)
    wanted = ImagePreprocessing(scale=1 / 255, mean=[0.5], std=[0.25])
    result = teacher_inputs(x, data, wanted)
    assert result.dtype == np.float32
    expected = [[[[-2.0, -1.7490196078431372], [-0.996078431372549, 2.0]]]]
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_a_bgr_teacher_gets_an_rgb_datasets_channels_reversed() -> None:
    # An archive's RGB pixels; the teacher (an OpenCV-trained convnet) takes BGR / 255 - mean.
    x = np.array([[[[255.0]], [[51.0]], [[0.0]]]], np.float32)  # one red-ish pixel
    data = ImagePreprocessing(scale=1.0, channel_order="RGB")
    teacher = ImagePreprocessing(scale=1 / 255, mean=[0.1, 0.2, 0.3], channel_order="BGR")
    result = teacher_inputs(x, data, teacher)
    np.testing.assert_allclose(
        result.reshape(3), [0.0 - 0.1, 0.2 - 0.2, 1.0 - 0.3], rtol=1e-6, atol=1e-6
    )


def test_teacher_inputs_undoes_the_data_mean_and_std() -> None:
    # Pixels [0, 255, 51, 153] stored as (p / 255 - 0.5) / 0.5; the teacher takes p / 255.
    x = np.array([[[[-1.0, 1.0], [-0.6, 0.2]]]], np.float32)
    data = ImagePreprocessing(scale=1 / 255, mean=[0.5], std=[0.5])
    result = teacher_inputs(x, data, ImagePreprocessing(scale=1 / 255))
    np.testing.assert_allclose(result, [[[[0.0, 1.0], [0.2, 0.6]]]], rtol=1e-5, atol=1e-6)


def test_teacher_inputs_as_stored_without_image_preprocessing() -> None:
    x = np.array([[1.0, 200.0, 3.0]], np.float32)
    assert teacher_inputs(x, RawTensors(), RawTensors()) is x
    assert teacher_inputs(x, ImagePreprocessing(scale=1 / 255), RawTensors()) is x


def test_teacher_inputs_equal_preprocessing_is_the_same_array() -> None:
    x = np.array([[[[0.5, 1.0]]]], np.float32)
    same = ImagePreprocessing(scale=1 / 255, mean=[0.5], std=[0.25])
    assert teacher_inputs(x, same, same) is x
    equal = ImagePreprocessing(scale=1 / 255, mean=[0.5], std=[0.25])
    assert equal is not same
    assert teacher_inputs(x, same, equal) is x


# --- _below_chance --------------------------------------------------------------------------


def one_hot_logits(argmax: np.ndarray, classes: int) -> np.ndarray:
    logits: np.ndarray = np.eye(classes, dtype=np.float32)[argmax]
    return logits


def test_below_chance_names_a_label_offset() -> None:
    argmax = np.arange(100) % 10
    labels = (argmax + 2) % 10
    error = _below_chance("t1", one_hot_logits(argmax, 10), labels, 0.0, 0.1)
    assert error.code == "teacher_below_chance"
    assert "shifted by +2" in error.detail
    assert error.extra == {"label_offset": 2}
    assert "Teacher t1 gets 0.0% of 100 labelled samples right" in error.detail


def test_below_chance_names_a_negative_offset() -> None:
    argmax = np.arange(100) % 10
    labels = (argmax - 1) % 10
    error = _below_chance("t1", one_hot_logits(argmax, 10), labels, 0.0, 0.1)
    assert "shifted by -1" in error.detail
    assert error.extra == {"label_offset": -1}


def test_below_chance_names_a_wrapping_shift_of_half_the_classes() -> None:
    """(class + 2) mod 4 and a swapped two-class labelling are one shift each, modulo C."""
    argmax = np.arange(100) % 4
    error = _below_chance("t", one_hot_logits(argmax, 4), (argmax + 2) % 4, 0.0, 0.25)
    assert error.extra == {"label_offset": 2}
    argmax = np.arange(100) % 2
    error = _below_chance("t", one_hot_logits(argmax, 2), 1 - argmax, 0.0, 0.5)
    assert error.extra == {"label_offset": 1} and "modulo 2" in error.detail


def test_below_chance_random_labels_give_the_generic_advice() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(100, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 100)
    accuracy = float((logits.argmax(-1) == labels).mean())
    error = _below_chance("t1", logits, labels, accuracy, 0.15)
    assert error.code == "teacher_below_chance"
    assert error.extra == {}
    assert "shifted" not in error.detail
    assert "Check that the labels index the teacher's classes" in error.detail


# --- TeacherBackend._batched ----------------------------------------------------------------


class RecordingBackend(TeacherBackend):
    """Returns each row's sum (and, for names, twice the inputs); records every batch."""

    def __init__(self, fixed_batch: int | None) -> None:
        self.signature = ModelSignature.for_tensor((3,), 1)
        self.fixed_batch = fixed_batch
        self.batches: list[np.ndarray] = []

    def run(self, batch: np.ndarray, names: list[str] | None) -> list[np.ndarray]:
        self.batches.append(batch.copy())
        sums = batch.astype(np.float64).sum(axis=1, keepdims=True)
        return [sums] if names is None else [sums, batch * 2]

    def latency_ms(self, batch: int = 1) -> float:
        return 0.0


X10 = np.arange(30, dtype=np.float32).reshape(10, 3)  # row i: [3i, 3i + 1, 3i + 2]
ROW_SUMS = [[3.0], [12.0], [21.0], [30.0], [39.0], [48.0], [57.0], [66.0], [75.0], [84.0]]


def test_batched_fixed_batch_pads_and_trims() -> None:
    backend = RecordingBackend(fixed_batch=4)
    calls: list[int] = []
    scores = backend.scores(X10, batch_size=128, on_batch=lambda: calls.append(1))
    assert [len(b) for b in backend.batches] == [4, 4, 4]
    assert len(calls) == 3
    np.testing.assert_array_equal(backend.batches[2][:2], X10[8:])
    np.testing.assert_array_equal(backend.batches[2][2:], np.zeros((2, 3), np.float32))
    assert backend.batches[2].dtype == np.float32
    assert scores.dtype == np.float32
    assert scores.shape == (10, 1)
    assert scores.tolist() == ROW_SUMS


def test_batched_fixed_batch_features() -> None:
    backend = RecordingBackend(fixed_batch=4)
    sums, doubled = backend.features(X10, ["a", "b"])
    assert [len(b) for b in backend.batches] == [4, 4, 4]
    assert sums.tolist() == ROW_SUMS
    assert doubled.shape == (10, 3)
    np.testing.assert_array_equal(doubled, X10 * 2)


def test_batched_without_fixed_batch_uses_batch_size() -> None:
    backend = RecordingBackend(fixed_batch=None)
    scores = backend.scores(X10, batch_size=4)
    assert [len(b) for b in backend.batches] == [4, 4, 2]
    assert scores.tolist() == ROW_SUMS


# --- Standardize ----------------------------------------------------------------------------


def test_standardize_images_constant_channel_and_population_std() -> None:
    x = torch.tensor(
        [
            [[[5.0, 5.0], [5.0, 5.0]], [[0.0, 1.0], [2.0, 3.0]]],
            [[[5.0, 5.0], [5.0, 5.0]], [[4.0, 5.0], [6.0, 7.0]]],
        ]
    )
    layer = Standardize((2, 2, 2))
    layer.fit(x)
    assert layer.mean.shape == (2, 1, 1)
    assert layer.mean.flatten().tolist() == [5.0, 3.5]
    # Channel 1: mean 3.5, squared deviations summing to 42 over 8 values: std sqrt(5.25)
    # (the sample std would be sqrt(6) = 2.449).
    assert layer.std.flatten().tolist() == pytest.approx([1.0, 2.29128784747792], rel=1e-6)
    out = layer(x)
    assert out[:, 0].flatten().tolist() == [0.0] * 8
    assert out[0, 1, 0, 0].item() == pytest.approx(-3.5 / 2.29128784747792, rel=1e-6)


def test_standardize_flat_features() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 7.0]])
    layer = Standardize((3,))
    layer.fit(x)
    assert layer.mean.tolist() == [2.0, 2.0, 5.0]
    assert layer.std.tolist() == [1.0, 1.0, 2.0]
    assert layer(x).tolist() == [[-1.0, 0.0, -1.0], [1.0, 0.0, 1.0]]


def test_standardize_one_sample() -> None:
    layer = Standardize((2,))
    layer.fit(torch.tensor([[4.0, -2.0]]))
    assert layer.mean.tolist() == [4.0, -2.0]
    assert layer.std.tolist() == [1.0, 1.0]


# --- _LoopCallbacks.epoch_end ---------------------------------------------------------------


class EpochRecorder(SilentEvents):
    def __init__(self) -> None:
        self.epochs: list[tuple[int, dict[str, float]]] = []

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        self.epochs.append((epoch, values))


def test_epoch_end_refuses_a_non_finite_training_term() -> None:
    with pytest.raises(JobFailure) as caught:
        _LoopCallbacks(SilentEvents(), None).epoch_end(
            3, {"train_loss": float("nan"), "val_accuracy": 0.5}
        )
    assert caught.value.code == "non_finite_loss"
    assert "epoch 3" in caught.value.detail
    assert "train_loss" in caught.value.detail


def test_epoch_end_names_every_diverged_term_and_reports_nothing() -> None:
    events = EpochRecorder()
    with pytest.raises(JobFailure) as caught:
        _LoopCallbacks(events, None).epoch_end(
            1, {"train_kd": float("inf"), "train_ce": float("-inf"), "train_loss": 1.0}
        )
    assert "train_ce, train_kd" in caught.value.detail
    assert events.epochs == []


def test_epoch_end_passes_finite_values_through() -> None:
    events = EpochRecorder()
    values = {"train_loss": 0.25, "val_accuracy": 0.5, "val_kl": float("nan")}
    _LoopCallbacks(events, None).epoch_end(2, values)
    assert events.epochs == [(2, values)]


# --- apply_declarations ---------------------------------------------------------------------


def info(*outputs: tuple[str, int]) -> TeacherInfo:
    """An ONNX-like inspection: every output a candidate and a feature layer, the first chosen."""
    return TeacherInfo(
        format="onnx",
        signature=ModelSignature(
            inputs=[TensorSpec(name="input", shape=[4])],
            outputs=[OutputSpec(name=name, shape=[width]) for name, width in outputs],
        ),
        parameter_count=0,
        scores_choice=ScoresChoice(output=outputs[0][0], by="position"),
        feature_layers=[FeatureLayer(name=name, shape=[width]) for name, width in outputs],
    )


def test_apply_declarations_classes_of_the_wrong_count() -> None:
    with pytest.raises(InvalidModel) as caught:
        apply_declarations(info(("logits", 3)), TeacherDeclarations(classes=["a", "b"]))
    assert caught.value.extra["field"] == "classes"
    assert "each of the 3 scores" in caught.value.detail


def test_apply_declarations_duplicate_classes() -> None:
    with pytest.raises(InvalidModel) as caught:
        apply_declarations(info(("logits", 3)), TeacherDeclarations(classes=["a", "b", "a"]))
    assert caught.value.extra["field"] == "classes"
    assert "(2 distinct)" in caught.value.detail


def test_apply_declarations_classes_and_kind() -> None:
    declared = TeacherDeclarations(classes=["a", "b", "c"], output_kind=OutputKind.PROBABILITIES)
    result = apply_declarations(info(("logits", 3)), declared)
    assert result.signature.scores.classes == ["a", "b", "c"]
    assert result.signature.scores.kind is OutputKind.PROBABILITIES
    assert result.scores_choice == ScoresChoice(output="logits", by="name", kind_by="declared")


def test_apply_declarations_without_kind_assumes_logits() -> None:
    result = apply_declarations(info(("out", 3)), TeacherDeclarations())
    assert result.signature.scores.kind is OutputKind.LOGITS
    assert result.scores_choice == ScoresChoice(output="out", by="only", kind_by="assumed")
    assert result.feature_layers == []


def test_apply_declarations_unknown_output_lists_candidates() -> None:
    with pytest.raises(InvalidModel) as caught:
        apply_declarations(
            info(("output_0", 32), ("output_1", 10)), TeacherDeclarations(output="scores")
        )
    assert caught.value.extra["field"] == "output"
    assert "'scores'" in caught.value.detail
    assert "['output_0', 'output_1']" in caught.value.detail


def test_apply_declarations_declared_output() -> None:
    result = apply_declarations(
        info(("output_0", 32), ("output_1", 10)), TeacherDeclarations(output="output_1")
    )
    assert result.scores_choice == ScoresChoice(output="output_1", by="declared")
    assert [o.name for o in result.signature.outputs] == ["output_1", "output_0"]
    assert result.feature_layers == [FeatureLayer(name="output_0", shape=[32])]


def test_apply_declarations_chooses_by_name() -> None:
    result = apply_declarations(
        info(("output_0", 32), ("probabilities", 10)), TeacherDeclarations()
    )
    assert result.scores_choice == ScoresChoice(output="probabilities", by="name")
    assert [o.name for o in result.signature.outputs] == ["probabilities", "output_0"]
    assert result.signature.scores.shape == [10]
    assert result.feature_layers == [FeatureLayer(name="output_0", shape=[32])]
    upper = apply_declarations(info(("features", 32), ("Logits", 10)), TeacherDeclarations())
    assert upper.scores_choice == ScoresChoice(output="Logits", by="name")


def test_apply_declarations_first_of_several_by_position() -> None:
    result = apply_declarations(info(("output_0", 32), ("output_1", 10)), TeacherDeclarations())
    assert result.scores_choice == ScoresChoice(output="output_0", by="position")
    assert [o.name for o in result.signature.outputs] == ["output_0", "output_1"]
    assert result.feature_layers == [FeatureLayer(name="output_1", shape=[10])]
    # The preflight then settles on the output of the dataset's class count.
    signature, layers, choice = settle_scores(
        result.signature, result.feature_layers, result.scores_choice, 10
    )
    assert choice == ScoresChoice(output="output_1", by="classes")
    assert signature.scores.name == "output_1"
    assert layers == [FeatureLayer(name="output_0", shape=[32])]


def test_apply_declarations_preprocessing() -> None:
    preprocessing = ImagePreprocessing(scale=1 / 255, mean=[0.5], std=[0.25])
    result = apply_declarations(
        info(("logits", 3)), TeacherDeclarations(preprocessing=preprocessing)
    )
    assert result.signature.preprocessing == preprocessing


def test_apply_declarations_checks_per_channel_values_against_the_channels() -> None:
    """One mean/std value, or one per channel of `[C, H, W]`; a flat input takes one."""
    image = TeacherInfo(
        format="onnx",
        signature=ModelSignature.for_tensor((3, 4, 4), 2),
        parameter_count=0,
        scores_choice=ScoresChoice(output="logits", by="only"),
    )
    per_channel = ImagePreprocessing(mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    declared = apply_declarations(image, TeacherDeclarations(preprocessing=per_channel))
    assert declared.signature.preprocessing == per_channel
    for wrong, teacher in (
        (ImagePreprocessing(mean=[0.5, 0.5]), image),
        (per_channel, info(("logits", 3))),
    ):
        with pytest.raises(InvalidModel) as caught:
            apply_declarations(teacher, TeacherDeclarations(preprocessing=wrong))
        assert caught.value.extra["field"] == "preprocessing"
