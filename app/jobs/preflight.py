"""The preflight: the teacher run on a sample of the data before any training, so a job that
cannot give a meaningful student fails at once with a specific code, and a suspicious one says
why. The API runs it at submission when the data are at hand cheaply, the worker as the job's
first step; both call ``run_preflight``.

What it settles is recorded on the teacher's signature (which output holds the scores, and
their kind) and in the job's ``preflight`` (the report below, warnings included).
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from app.datasets.arrays import DatasetArrays
from app.errors import PreflightFailed
from app.ml.layers import FeatureLayer
from app.ml.signature import (
    AnyPreprocessing,
    ImagePreprocessing,
    ModelSignature,
    OutputKind,
    RawTensors,
)
from app.ml.teacher_formats import ScoresChoice, TeacherBackend
from app.ml.teacher_formats.base import ModelInputs, as_logits, with_scores

SAMPLES = 512
SEED = 0
# Row sums (probabilities) and log-sum-exps (log-probabilities) within this of their exact
# value: float16 teachers over many classes drift by about 1e-3; logits never come close.
KIND_TOLERANCE = 1e-2
# Integer pixel data is tried divided by the first of these at least its maximum.
PIXEL_MAXIMA = (1, 16, 255, 65_535)
# The scale is suspected when scaled inputs remove at least this share of the teacher's errors
# on the sample (and at least this many of them): a ReLU network is nearly scale-invariant, so a
# wrong scale may cost only a few points (a digits MLP trained on pixels / 255: 98.3% of the
# test split on them, 95.5% on raw pixels; 100% and 99.0% of a training sample).
SCALE_ERROR_CUT, SCALE_MIN_GAIN = 0.25, 3
# Inputs made with a declared scale alone whose brightest value is below this were most likely
# scaled twice (data already in [0, 1], scaled again by 1/16 or 1/255).
RANGE_FLOOR = 0.25


class Finding(BaseModel):
    """A warning: the job runs, and says this."""

    code: str
    detail: str


class TeacherCheck(BaseModel):
    id: str
    output: str = Field(description="The output taken as the class scores.")
    chosen_by: str = Field(description="How that output was chosen (see `scores_choice`).")
    output_kind: OutputKind
    kind_by: str = Field(description="`declared`, `detected` (from the scores) or `assumed`.")
    accuracy: float | None = Field(
        description="Top-1 accuracy on the labelled sample, labels mapped to the teacher's classes."
    )
    fixed_batch: int | None = Field(
        default=None, description="The batch size the teacher's graph fixes, if any."
    )


class PreflightReport(BaseModel):
    """What the preflight found. ``label_map[i]`` is the teacher class of dataset label ``i``
    when the two name their classes differently (None: labels are teacher classes)."""

    stage: Literal["submission", "worker"]
    samples: int
    labelled_split: Literal["train", "test"]
    chance: float = Field(description="The most frequent label's share in the sample.")
    label_map: list[int] | None = None
    teachers: list[TeacherCheck]
    warnings: list[Finding] = []


@dataclass
class PreflightTeacher:
    """One teacher as the preflight sees it; ``signature``, ``choice`` and ``feature_layers``
    are updated in place with what it settles (the backend runs with the new signature)."""

    id: str
    backend: TeacherBackend
    choice: ScoresChoice
    feature_layers: list[FeatureLayer]

    @property
    def signature(self) -> ModelSignature:
        return self.backend.signature


def settle_scores(
    signature: ModelSignature,
    layers: list[FeatureLayer],
    choice: ScoresChoice,
    num_classes: int,
) -> tuple[ModelSignature, list[FeatureLayer], ScoresChoice]:
    """Where the scores were only the first of several outputs, take the one whose width is the
    dataset's class count, if exactly one is; the others are feature layers."""
    if choice.by != "position":
        return signature, layers, choice
    fitting = [o.name for o in signature.outputs if o.shape[-1] == num_classes]
    if len(fitting) != 1:
        return signature, layers, choice
    signature, layers = with_scores(signature, layers, fitting[0])
    return signature, layers, choice.model_copy(update={"output": fitting[0], "by": "classes"})


def teacher_inputs(
    x: ModelInputs, data: AnyPreprocessing, teacher: AnyPreprocessing
) -> ModelInputs:
    """The dataset's inputs as the teacher takes them (``[N, C, ...]``; ``[N, D]`` flat).

    A teacher that declares image preprocessing gets ``(pixel * scale - mean) / std`` per
    channel, computed from the dataset's pixels (its own preprocessing undone first, where the
    two differ), in its channel order (an RGB dataset's channels reversed for a BGR teacher).
    Anything else is fed as stored. The student always takes the stored inputs: its input
    standardisation absorbs any such affine map.
    """
    if not isinstance(teacher, ImagePreprocessing) or data == teacher:
        return x
    assert isinstance(x, np.ndarray)  # image preprocessing: the inputs are arrays
    pixels = x
    if isinstance(data, ImagePreprocessing):
        pixels = _affine_inverse(x, data)
        if {data.channel_order, teacher.channel_order} == {"RGB", "BGR"}:
            pixels = pixels[:, ::-1]
    elif not isinstance(data, RawTensors):
        return x
    return _affine(pixels, teacher)


def _channel(values: list[float], rank: int) -> np.ndarray:
    return np.asarray(values, np.float32).reshape((1, -1) + (1,) * (rank - 2))


def _affine(x: np.ndarray, p: ImagePreprocessing) -> np.ndarray:
    y = x * np.float32(p.scale)
    if p.mean is not None:
        y = y - _channel(p.mean, x.ndim)
    if p.std is not None:
        y = y / _channel(p.std, x.ndim)
    return y.astype(np.float32, copy=False)


def _affine_inverse(x: np.ndarray, p: ImagePreprocessing) -> np.ndarray:
    y = x
    if p.std is not None:
        y = y * _channel(p.std, x.ndim)
    if p.mean is not None:
        y = y + _channel(p.mean, x.ndim)
    return (y / np.float32(p.scale)).astype(np.float32, copy=False)


def detect_kind(scores: np.ndarray) -> OutputKind:
    """What finite scores ``[N, classes]`` are: probabilities (non-negative, each row summing to
    1), log-probabilities (each row's log-sum-exp 0, ``-inf`` allowed), else logits."""
    finite = scores[np.isfinite(scores)]
    if finite.size and finite.min() >= 0 and np.allclose(scores.sum(-1), 1, atol=KIND_TOLERANCE):
        return OutputKind.PROBABILITIES
    peak = np.max(scores, axis=-1, keepdims=True)
    if np.isfinite(peak).all() and peak.max() <= KIND_TOLERANCE:
        logsumexp = peak[..., 0] + np.log(np.exp(scores - peak).sum(-1))
        if np.allclose(logsumexp, 0, atol=KIND_TOLERANCE):
            return OutputKind.LOG_PROBABILITIES
    return OutputKind.LOGITS


def non_finite_rows(scores: np.ndarray) -> np.ndarray:
    """Rows holding NaN or ``+inf``, or nothing but ``-inf``: samples with no usable scores.
    (A ``-inf`` among finite scores is a probability of zero.)"""
    bad: np.ndarray = np.isnan(scores).any(-1) | np.isposinf(scores).any(-1)
    return bad | np.isneginf(scores).all(-1)


def refuse_non_finite(
    scores: np.ndarray, teacher_id: str, what: str, rows: np.ndarray | None = None
) -> None:
    """Raises ``PreflightFailed`` (``teacher_non_finite``) if any row has no usable scores;
    ``rows[i]`` is the dataset row of ``scores[i]`` (default: ``i``), as the error names them."""
    bad = np.flatnonzero(non_finite_rows(scores))
    if len(bad):
        first = (bad if rows is None else rows[bad])[:5].tolist()
        raise PreflightFailed(
            f"Teacher {teacher_id} returned NaN or infinite scores for {len(bad)} of "
            f"{len(scores)} {what} (first rows of the split: {first}). A student cannot learn "
            "from them: fix the model (a log of 0, a division by 0, an overflow in float16) or "
            "remove those samples.",
            code="teacher_non_finite",
            samples=len(bad),
            rows=first,
        )


def label_map(data: DatasetArrays, signature: ModelSignature) -> list[int] | None:
    """Dataset label -> teacher class, matched by name when both name their classes and the
    names differ in order; None when labels already are the teacher's class indices.

    Raises:
        PreflightFailed: ``class_names_mismatch``, a dataset class the teacher does not name.
    """
    teacher = signature.scores.classes
    numbered = data.classes == [str(i) for i in range(len(data.classes))]
    if teacher is None or numbered or teacher[: len(data.classes)] == data.classes:
        return None
    index = {name: i for i, name in enumerate(teacher)}
    missing = [name for name in data.classes if name not in index]
    if missing:
        raise PreflightFailed(
            f"The dataset's classes {missing[:5]} are not among the teacher's class names "
            f"({teacher[:10]}{'...' if len(teacher) > 10 else ''}). Name the classes alike on "
            "both uploads (`classes`), or leave the names out to match labels by index.",
            code="class_names_mismatch",
            field="dataset",
        )
    return [index[name] for name in data.classes]


def _sample(
    data: DatasetArrays,
) -> tuple[ModelInputs, np.ndarray, np.ndarray, Literal["train", "test"]]:
    """Up to ``SAMPLES`` labelled samples: inputs, labels, their rows in the split, the split."""
    x, y, split = data.x_train, data.y_train, "train"
    if y is None:  # an unlabelled transfer set is scored on its (labelled) test split
        x, y, split = data.x_test, data.y_test, "test"
    order = np.random.default_rng(SEED).permutation(len(x))[:SAMPLES]
    order.sort()
    return x[order], y[order], order, split  # type: ignore[return-value]


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())


def _below_chance(
    teacher_id: str, logits: np.ndarray, labels: np.ndarray, accuracy: float, chance: float
) -> PreflightFailed:
    """The refusal, naming an offset between labels and teacher classes when one explains it."""
    classes = logits.shape[-1]
    # Shifts modulo the class count: labels (class + k) mod C are one shift, wrapping or not.
    shifts = np.bincount((labels - logits.argmax(-1)) % classes, minlength=classes)
    shift = int(shifts.argmax())
    shift = shift - classes if shift > classes // 2 else shift
    shifted = float(shifts.max() / len(labels))
    detail = (
        f"Teacher {teacher_id} gets {accuracy:.1%} of {len(labels)} labelled samples right, no "
        f"better than chance ({chance:.1%}: always answering the most frequent label), so no "
        "student could learn anything from it. "
    )
    extra: dict[str, object] = {}
    if shift != 0 and shifted > 0.5 and shifted > chance:
        detail += (
            f"The labels look shifted by {shift:+d} against the teacher's classes: label = "
            f"teacher class {shift:+d} (modulo {classes}) holds for {shifted:.1%} of them. "
            "Renumber the labels, "
            "or name the classes on both uploads (`classes`) so Distill matches them by name."
        )
        extra["label_offset"] = shift
    else:
        detail += (
            "Check that the labels index the teacher's classes in its order, that the inputs "
            "are prepared as in its training (scale, normalisation: `preprocessing` at upload), "
            "and that the right output holds the scores (`output` at upload)."
        )
    return PreflightFailed(detail, code="teacher_below_chance", **extra)


def _check_kind(teacher: PreflightTeacher, scores: np.ndarray) -> None:
    """Record the scores' kind, detected from them unless declared; a declaration the scores
    contradict is refused (``output_kind_mismatch``)."""
    detected = detect_kind(scores)
    declared = teacher.choice.kind_by == "declared"
    kind = teacher.signature.scores.kind
    if declared and detected != kind and OutputKind.PROBABILITIES in (kind, detected):
        raise PreflightFailed(
            f"Teacher {teacher.id} was declared to output {kind}, but its scores look like "
            f"{detected}. Upload it again with the right `output_kind`, or without one to let "
            "Distill detect it.",
            code="output_kind_mismatch",
        )
    if declared:
        return
    scores_spec = teacher.signature.scores.model_copy(update={"kind": detected})
    teacher.backend.signature = teacher.signature.model_copy(
        update={"outputs": [scores_spec, *teacher.signature.outputs[1:]]}
    )
    teacher.choice = teacher.choice.model_copy(update={"kind_by": "detected"})


def _scale_warning(
    backend: TeacherBackend, x: np.ndarray, labels: np.ndarray, accuracy: float
) -> Finding | None:
    """Integer pixel-like data fed to a teacher that declared no scaling: does it do much
    better on them scaled to [0, 1]?"""
    low, high = float(x.min()), float(x.max())
    if low < 0 or high <= 1 or not np.array_equal(x, np.round(x)):
        return None
    divisor = next((m for m in PIXEL_MAXIMA if m >= high), None)
    if divisor is None:
        return None
    scaled = _accuracy(backend.logits(x / np.float32(divisor)), labels)
    errors, scaled_errors = round((1 - accuracy) * len(x)), round((1 - scaled) * len(x))
    if errors - scaled_errors < SCALE_MIN_GAIN or scaled_errors > (1 - SCALE_ERROR_CUT) * errors:
        return None
    return Finding(
        code="input_scale_suspect",
        detail=f"The teacher gets {accuracy:.1%} of the sample right on the inputs as stored "
        f"(whole numbers in [{low:g}, {high:g}]) but {scaled:.1%} on them divided by "
        f"{divisor}: it was likely trained on scaled inputs. Upload it with `preprocessing` "
        f'{{"kind": "image", "scale": {1 / divisor!r}}}; the student will still take the stored '
        "values.",
    )


def _range_warning(x: np.ndarray, preprocessing: ImagePreprocessing) -> Finding | None:
    """Inputs made with a declared scale alone should lie in about [0, 1]."""
    if preprocessing.mean is not None or preprocessing.std is not None:
        return None
    low, high = float(x.min()), float(x.max())
    if low >= -0.01 and RANGE_FLOOR <= high <= 1.01:
        return None
    return Finding(
        code="input_range",
        detail=f"With the teacher's declared scale {preprocessing.scale:g} its inputs span "
        f"[{low:.4g}, {high:.4g}], not about [0, 1]: check that the dataset stores raw pixels "
        "(data already scaled to [0, 1] need no declared scale).",
    )


def run_preflight(
    teachers: list[PreflightTeacher],
    data: DatasetArrays,
    *,
    stage: Literal["submission", "worker"],
) -> PreflightReport:
    """Run each teacher on up to ``SAMPLES`` labelled samples and check what a student needs.

    Refuses (``PreflightFailed``, a 422 at submission, the job's failure code in the worker):
    ``teacher_non_finite`` (NaN/``+inf`` scores), ``output_kind_mismatch``,
    ``class_names_mismatch``, ``teacher_below_chance`` (top-1 accuracy at or below the most
    frequent label's share; an offset between labels and classes is named). Warns:
    ``output_kind_detected``, ``scores_output_chosen``, ``input_scale_suspect``,
    ``input_range``, ``teacher_fixed_batch``, ``constant_features``.
    """
    x, y, rows, split = _sample(data)
    warnings: list[Finding] = []
    num_classes = len(data.classes)
    mapping = label_map(data, teachers[0].signature)
    labels = y if mapping is None else np.asarray(mapping)[y]
    chance = float(np.bincount(y).max() / len(y))
    checks = []
    for teacher in teachers:
        teacher.backend.signature, teacher.feature_layers, teacher.choice = settle_scores(
            teacher.signature, teacher.feature_layers, teacher.choice, num_classes
        )
        if teacher.choice.by == "classes":
            width = teacher.signature.num_classes
            warnings.append(
                Finding(
                    code="scores_output_chosen",
                    detail=f"Teacher {teacher.id} has several outputs; `{teacher.choice.output}` "
                    f"was taken as its class scores, being the one with {width} values. Name it "
                    "with `output` at upload to choose otherwise.",
                )
            )
        inputs = teacher_inputs(x, data.preprocessing, teacher.signature.preprocessing)
        scores = teacher.backend.scores(inputs)
        refuse_non_finite(scores, teacher.id, f"sampled {split} samples", rows)
        _check_kind(teacher, scores)
        kind = teacher.signature.scores.kind
        if teacher.choice.kind_by == "detected" and kind is not OutputKind.LOGITS:
            warnings.append(
                Finding(
                    code="output_kind_detected",
                    detail=f"Teacher {teacher.id}'s scores are {kind} (detected from them); "
                    "they are turned into logits (their log) before any loss or metric.",
                )
            )
        logits = as_logits(scores, kind)
        accuracy = _accuracy(logits, labels)
        if accuracy <= chance and accuracy < 1:  # (a sample of one class: chance is 1)
            raise _below_chance(teacher.id, logits, labels, accuracy, chance)
        preprocessing = teacher.signature.preprocessing
        finding = None
        if isinstance(preprocessing, ImagePreprocessing):
            assert isinstance(inputs, np.ndarray)
            finding = _range_warning(inputs, preprocessing)
        elif isinstance(x, np.ndarray):  # (tokenised text has no scale)
            finding = _scale_warning(teacher.backend, x, labels, accuracy)
        if finding is not None:
            warnings.append(finding)
        if teacher.backend.fixed_batch is not None:
            warnings.append(
                Finding(
                    code="teacher_fixed_batch",
                    detail=f"Teacher {teacher.id}'s graph fixes its batch size at "
                    f"{teacher.backend.fixed_batch}: it runs that many samples at a time (slower; "
                    "its latency is that of one such batch). Export it with a dynamic batch "
                    "dimension to run it faster.",
                )
            )
        checks.append(
            TeacherCheck(
                id=teacher.id,
                output=teacher.choice.output,
                chosen_by=teacher.choice.by,
                output_kind=kind,
                kind_by=teacher.choice.kind_by,
                accuracy=accuracy,
                fixed_batch=teacher.backend.fixed_batch,
            )
        )
    if isinstance(data.x_train, np.ndarray) and len(data.input_shape) == 1:
        constant = int((data.x_train.max(0) == data.x_train.min(0)).sum())
        if constant:
            warnings.append(
                Finding(
                    code="constant_features",
                    detail=f"{constant} input feature(s) never vary in the training data. The "
                    "student gives them scale 1 (scikit-learn's convention), so a value there "
                    "at serving moves its input by that value; the teacher may react otherwise.",
                )
            )
    return PreflightReport(
        stage=stage,
        samples=len(y),
        labelled_split=split,
        chance=chance,
        label_map=mapping,
        teachers=checks,
        warnings=warnings,
    )
