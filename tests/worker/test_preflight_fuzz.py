"""Property-based fuzzing of the preflight and the whole recipe on random small ONNX teachers.

What is fuzzed: small synthetic classification data (2..6 classes, 4..12 features, 60..200
samples in Gaussian clusters, flat ``[N, D]`` or image-like ``[N, 1, 2, D/2]``, sometimes
whole-number "pixels" in 0..255) and an ONNX teacher built instantly from numpy weights (an exact
nearest-centroid classifier, or a small MLP fitted for a fraction of a second) whose export
varies the way users' exports do: its head (logits, probabilities, log-probabilities), a hidden
layer as a second output before or after the scores, named (``logits``/``features``) or not
(``output_1``/``output_0``), its input dtype (float32/16/64), a fixed batch of 1, NaN rows or
``-inf`` entries, a teacher made for pixels / 255 (the graph scaling itself, the scale declared
at upload, or forgotten), labels shifted against the teacher's classes, class names matched by
name (or one missing), and a declared ``output_kind`` (right or wrong).

Why: the preflight must refuse, with a specific code, every job whose student would mean
nothing, and must otherwise hand training the teacher's scores unmangled (the right output, its
kind detected, no softmax applied twice); the recipe must then report figures the served
artifact reproduces. Each example runs the real recipe in process (no database, no cache) and
checks that contract (issue 9) against an independent numpy reference of the same graph
(``tests.helpers.onnx_teachers.reference_scores``), including which outcome the reference says
the job must have. Hypothesis is derandomized and keeps no database, so CI always runs the same
examples (the explicit ones below, then 25 drawn).

Tests at the end pin a bug it found: declarations (``output_kind``, ``classes``) for a teacher
whose scores are not its first unnamed output used to land on that first output.
"""

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from app.datasets.arrays import DatasetArrays
from app.errors import PreflightFailed
from app.jobs.preflight import PreflightReport
from app.jobs.schemas import DistillationSpec, JobResult
from app.ml.predictor import load_predictor
from app.ml.signature import ImagePreprocessing, OutputKind
from app.ml.teacher_formats.base import TeacherDeclarations
from app.models import ArtifactFormat
from tests.helpers.onnx_teachers import (
    FeaturesPosition,
    Head,
    InputDtype,
    MlpWeights,
    NonFinite,
    centroid_teacher,
    fit_mlp,
    reference_scores,
    write_onnx_teacher,
)
from worker.recipe import DistillationRecipe, JobFailure, RecipeInputs, SilentEvents
from worker.teachers import TeacherRecord

KNOWN_CODES = frozenset(
    {
        "teacher_non_finite",
        "teacher_below_chance",
        "output_kind_mismatch",
        "class_names_mismatch",
        "shape_mismatch",
        "non_finite_loss",
    }
)
PIXEL_SCALE = 1.0 / 255.0
# Reference logits whose top two are closer than this (relative) may rank either way in
# onnxruntime's float32 arithmetic; such samples are the only slack allowed on accuracies.
TIE_TOLERANCE = 1e-3

Pixels = Literal["none", "in_graph", "declared", "undeclared"]
Naming = Literal["numbered", "by_name", "missing_name"]
NanCut = Literal["median", "train_max", "never"]
KindDeclaration = Literal["none", "right", "wrong"]


@dataclass(frozen=True)
class Case:
    """One drawn job: the data, the teacher's export and what the upload declares."""

    seed: int
    classes: int
    features: int
    samples: int
    image_layout: bool
    pixels: Pixels
    mlp_hidden: int | None  # None: the exact nearest-centroid teacher
    head: Head
    features_output: FeaturesPosition
    unnamed: bool
    input_dtype: InputDtype
    batch: int | None
    non_finite: NonFinite
    nan_cut: NanCut
    label_shift: int
    naming: Naming
    kind_declaration: KindDeclaration
    wrong_kind_pick: int

    @property
    def declared_kind(self) -> OutputKind | None:
        head = OutputKind(self.head)
        if self.kind_declaration == "none":
            return None
        if self.kind_declaration == "right":
            return head
        others = [k for k in OutputKind if k is not head]
        return others[self.wrong_kind_pick % len(others)]

    @property
    def scores_name(self) -> str:
        return "output_1" if self.unnamed else "logits"

    @property
    def features_name(self) -> str:
        return "output_0" if self.unnamed else "features"


def _weighted(*choices: tuple[Any, int]) -> st.SearchStrategy[Any]:
    """One of ``choices`` (value, weight); the first is what hypothesis shrinks towards."""
    return st.sampled_from([value for value, weight in choices for _ in range(weight)])


@st.composite
def cases(draw: st.DrawFn) -> Case:
    classes = draw(st.integers(2, 6))
    features = draw(st.integers(4, 12))
    return Case(
        seed=draw(st.integers(0, 2**32 - 1)),
        classes=classes,
        features=features,
        samples=draw(st.integers(60, 200)),
        image_layout=features % 2 == 0 and draw(st.booleans()),
        pixels=draw(_weighted(("none", 4), ("in_graph", 1), ("declared", 1), ("undeclared", 1))),
        # A hidden width equal to the class count would make two unnamed outputs ambiguous.
        mlp_hidden=draw(
            st.one_of(
                st.none(),
                st.none(),
                st.integers(2, 15).map(lambda h: h + (h >= classes)),  # never C
            )
        ),
        head=draw(st.sampled_from(["logits", "probabilities", "log_probabilities"])),
        features_output=draw(st.sampled_from(["none", "first", "last"])),
        unnamed=draw(st.booleans()),
        input_dtype=draw(st.sampled_from(["float32", "float16", "float64"])),
        batch=draw(_weighted((None, 3), (1, 1))),
        non_finite=draw(_weighted(("none", 3), ("neg_inf_entries", 1), ("nan_rows", 1))),
        nan_cut=draw(st.sampled_from(["never", "train_max", "median"])),
        label_shift=draw(_weighted((0, 6), (1, 1), (-1, 1))) % classes,
        naming=draw(_weighted(("numbered", 4), ("by_name", 2), ("missing_name", 1))),
        kind_declaration=draw(_weighted(("none", 4), ("right", 1), ("wrong", 1))),
        wrong_kind_pick=draw(st.integers(0, 1)),
    )


@dataclass(frozen=True)
class Built:
    """A case made concrete: the dataset, the teacher file, and the numpy expectations."""

    data: DatasetArrays
    teacher: TeacherRecord
    weights: MlpWeights
    fed_train: np.ndarray  # the inputs as the teacher must be fed them (declared scale applied)
    fed_test: np.ndarray
    graph_scale: float
    nan_threshold: float
    mapping: np.ndarray  # dataset label -> teacher class, as matching names implies


def build(case: Case, directory: Path) -> Built:
    rng = np.random.default_rng(case.seed)
    c, d, n = case.classes, case.features, case.samples
    y = rng.permutation(np.arange(n) % c)
    if case.pixels == "none":
        centroids = rng.normal(0.0, rng.uniform(1.0, 3.0), (c, d))
        x = (centroids[y] + rng.normal(0.0, 1.0, (n, d))).astype(np.float32)
        teacher_space_centroids = centroids.astype(np.float32)
    else:
        centroids = rng.uniform(40.0, 215.0, (c, d))
        noisy = centroids[y] + rng.normal(0.0, 25.0, (n, d))
        x = np.clip(np.round(noisy), 0, 255).astype(np.float32)
        # The teacher was made for pixels / 255.
        teacher_space_centroids = (centroids * PIXEL_SCALE).astype(np.float32)
    n_test = n // 4
    x_train, x_test, y_train, y_test = x[n_test:], x[:n_test], y[n_test:], y[:n_test]
    shape = (1, 2, d // 2) if case.image_layout else (d,)

    # What the teacher is fed: a declared scale is applied by Distill (x * float32(scale)).
    def fed(a: np.ndarray) -> np.ndarray:
        if case.pixels == "declared":
            return (a * np.float32(PIXEL_SCALE)).astype(np.float32)
        return a

    scaled_for_fit = x_train * np.float32(PIXEL_SCALE) if case.pixels != "none" else x_train
    if case.mlp_hidden is None:
        weights = centroid_teacher(teacher_space_centroids)
    else:
        weights = fit_mlp(scaled_for_fit, y_train, c, hidden=case.mlp_hidden, steps=150, seed=0)
    graph_scale = PIXEL_SCALE if case.pixels == "in_graph" else 1.0

    first = fed(x_train)[:, 0].astype(case.input_dtype).astype(np.float32)
    nan_threshold = {
        "median": float(np.median(first)),
        "train_max": float(first.max()),
        "never": math.inf,
    }[case.nan_cut]
    path = directory / "teacher.onnx"
    write_onnx_teacher(
        weights,
        shape,
        path,
        head=case.head,
        scores_name=case.scores_name,
        features=case.features_output,
        features_name=case.features_name,
        input_dtype=case.input_dtype,
        input_scale=graph_scale,
        batch=case.batch,
        non_finite=case.non_finite,
        nan_threshold=nan_threshold,
    )

    # Class names: numbered (labels are teacher classes), or named on both uploads with the
    # dataset listing them in another order (or naming one the teacher lacks).
    teacher_names = [f"class_{k}" for k in range(c)]
    if case.naming == "numbered":
        order = np.arange(c)
        dataset_names = [str(i) for i in range(c)]
    else:
        order = rng.permutation(c)  # dataset label i is teacher class order[i]
        dataset_names = [teacher_names[k] for k in order]
        if case.naming == "missing_name":
            dataset_names[int(rng.integers(c))] = "not_a_teacher_class"
    inverse = np.argsort(order)
    # A wrong labelling: every label shifted by k (mod C) against the teacher's classes.
    labels_train = (inverse[y_train] + case.label_shift) % c
    labels_test = (inverse[y_test] + case.label_shift) % c
    data = DatasetArrays(
        x_train.reshape(-1, *shape),
        labels_train.astype(np.int64),
        x_test.reshape(-1, *shape),
        labels_test.astype(np.int64),
        dataset_names,
    )
    declared = TeacherDeclarations(
        output=None,
        output_kind=case.declared_kind,
        classes=None if case.naming == "numbered" else teacher_names,
        preprocessing=ImagePreprocessing(scale=PIXEL_SCALE) if case.pixels == "declared" else None,
    )
    return Built(
        data=data,
        teacher=TeacherRecord.from_file(path, declared=declared),
        weights=weights,
        fed_train=fed(x_train).reshape(-1, *shape),
        fed_test=fed(x_test).reshape(-1, *shape),
        graph_scale=graph_scale,
        nan_threshold=nan_threshold,
        mapping=order,
    )


def reference(case: Case, built: Built, x: np.ndarray, head: Head) -> np.ndarray:
    return reference_scores(
        built.weights,
        x,
        head=head,
        input_dtype=case.input_dtype,
        input_scale=built.graph_scale,
        non_finite=case.non_finite,
        nan_threshold=built.nan_threshold,
    )


@dataclass(frozen=True)
class Expected:
    """A teacher's top-1 hits on a split, per the numpy reference, and how many could rank
    differently in onnxruntime (near-ties)."""

    correct: int
    ties: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    def admits(self, accuracy: float) -> bool:
        return abs(round(accuracy * self.total) - self.correct) <= self.ties and math.isclose(
            accuracy * self.total, round(accuracy * self.total), abs_tol=1e-9
        )


def expected_hits(case: Case, built: Built, x: np.ndarray, teacher_labels: np.ndarray) -> Expected:
    """Top-1 hits of the logits-head teacher (any head's argmax) on ``x``."""
    logits = reference(case, built, x, "logits").astype(np.float64)
    logits = np.where(np.isneginf(logits), -1e30, logits)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    ties = int(np.sum(top2[:, 1] - top2[:, 0] < TIE_TOLERANCE * np.maximum(1, np.abs(top2[:, 1]))))
    correct = int(np.sum(logits.argmax(-1) == teacher_labels))
    return Expected(correct, ties, len(x))


def majority_share(labels: np.ndarray) -> float:
    return float(np.bincount(labels).max() / len(labels))


def expected_outcomes(case: Case, built: Built) -> set[str]:
    """What the job must end in per the reference: failure codes, or ``"success"`` (a set:
    near-ties at the chance line admit either side)."""
    if case.naming == "missing_name":
        return {"class_names_mismatch"}
    train_labels = built.mapping[built.data.y_train]
    test_labels = built.mapping[built.data.y_test]

    def nan_rows(x: np.ndarray) -> bool:
        return bool(np.isnan(reference(case, built, x, case.head)).any())

    if nan_rows(built.fed_train):
        return {"teacher_non_finite"}
    declared = case.declared_kind
    head = OutputKind(case.head)
    if (
        declared is not None
        and declared is not head
        and OutputKind.PROBABILITIES in (declared, head)
    ):
        return {"output_kind_mismatch"}
    outcomes: set[str] = set()
    for x, labels, stage in (
        (built.fed_train, train_labels, "preflight"),
        (built.fed_test, test_labels, "evaluation"),
    ):
        if stage == "evaluation" and nan_rows(x):
            return outcomes | {"teacher_non_finite"}
        hits = expected_hits(case, built, x, labels)
        chance = majority_share(labels) * len(labels)
        if hits.correct + hits.ties <= chance and hits.correct + hits.ties < len(labels):
            return outcomes | {"teacher_below_chance"}
        if hits.correct - hits.ties <= chance:
            outcomes.add("teacher_below_chance")
    return outcomes | {"success"}


def spec() -> DistillationSpec:
    return DistillationSpec.model_validate(
        {
            "teacher": "teacher",
            "dataset": "fuzz",
            "student": {"architecture": "mlp", "hidden_sizes": [16]},
            "training": {"epochs": 2, "batch_size": 32, "learning_rate": 0.01, "seed": 0},
        }
    )


def floats_in(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in floats_in(v)]
    if isinstance(value, list):
        return [f for v in value for f in floats_in(v)]
    return []


def check_choice(case: Case, recipe: DistillationRecipe, failure: str | None) -> None:
    """The scores output and its kind, as settled by the preflight (as far as it got)."""
    # The hidden layer (2D wide for the centroid teacher, else not C) is never the scores.
    report: PreflightReport | None = getattr(recipe, "preflight", None)
    if report is None:
        # A refusal inside the preflight: the scores were settled on the opened teacher already
        # (class names are matched, and shapes checked, before that).
        if failure not in ("class_names_mismatch", "shape_mismatch") and recipe.backends:
            output = recipe.backends[0].signature.scores.name
            assert output == case.scores_name, f"scores taken from {output!r}"
        return
    check = report.teachers[0]
    assert check.output == case.scores_name, f"scores taken from {check.output!r}"
    if case.declared_kind is None:
        assert check.kind_by == "detected"
        assert check.output_kind is OutputKind(case.head), (
            f"{case.head} scores detected as {check.output_kind}"
        )
    else:
        assert check.kind_by == "declared" and check.output_kind is case.declared_kind


def check_report(case: Case, built: Built, report: PreflightReport) -> None:
    """A passed preflight's figures and warnings, against the reference."""
    data = built.data
    assert data.y_train is not None
    train_labels = built.mapping[data.y_train]
    # The whole (small) training split is the sample.
    assert report.labelled_split == "train" and report.samples == len(data.y_train)
    assert report.chance == majority_share(data.y_train)
    if case.naming == "by_name" and not np.array_equal(built.mapping, np.arange(case.classes)):
        assert report.label_map == built.mapping.tolist()
    else:
        assert report.label_map is None
    check = report.teachers[0]
    assert check.fixed_batch == case.batch
    hits = expected_hits(case, built, built.fed_train, train_labels)
    assert check.accuracy is not None and hits.admits(check.accuracy), (
        f"preflight accuracy {check.accuracy}, reference {hits.accuracy} ({hits.ties} near-ties)"
    )
    codes = {w.code for w in report.warnings}
    assert ("teacher_fixed_batch" in codes) == (case.batch is not None), codes
    assert ("output_kind_detected" in codes) == (
        case.declared_kind is None and case.head != "logits"
    ), codes
    several_unnamed = case.unnamed and case.features_output != "none"
    # Chosen by width: the dataset's class count, or that of the declared class names.
    assert ("scores_output_chosen" in codes) == several_unnamed, codes
    assert "input_range" not in codes, report.warnings  # a declared scale gives [0, 1] here
    if case.pixels != "undeclared":
        assert "input_scale_suspect" not in codes, report.warnings
    else:
        # Strong evidence of a forgotten scale must be reported, whatever the exact cut.
        scaled = expected_hits(case, built, built.fed_train / np.float32(255), train_labels)
        raw_errors = hits.total - hits.correct - hits.ties
        scaled_errors = scaled.total - scaled.correct + scaled.ties
        if raw_errors - scaled_errors >= 5 and scaled_errors <= 0.25 * raw_errors:
            assert "input_scale_suspect" in codes, (raw_errors, scaled_errors, report.warnings)


def check_success(case: Case, built: Built, recipe: DistillationRecipe, result: JobResult) -> None:
    data = built.data
    report = recipe.preflight
    labels = data.y_test if report.label_map is None else np.asarray(report.label_map)[data.y_test]
    # The served student reproduces the reported accuracy exactly (a float64 fraction).
    predictor = load_predictor(recipe.inputs.artifact_dir)
    predictions, probabilities = predictor.predict(data.x_test)
    assert np.count_nonzero(predictions == labels) / len(labels) == result.student_accuracy
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    # It names its outputs as the teacher does (else as the dataset does).
    assert predictor.manifest.classes == (
        data.classes if case.naming == "numbered" else built.teacher.signature.scores.classes
    )
    # A meaningful teacher, and figures that add up.
    assert result.teacher_accuracy > majority_share(labels)
    assert result.accuracy_retained == 100.0 * result.student_accuracy / result.teacher_accuracy
    dumped = result.model_dump(mode="python")
    assert all(math.isfinite(f) for f in floats_in(dumped)), dumped
    assert result.teacher_fixed_batch == case.batch
    assert [t.accuracy for t in result.teachers] == [result.teacher_accuracy]
    if case.label_shift != 0:
        return
    # The teacher's scores reached training unmangled (the right output, of the right kind, no
    # softmax applied twice): whatever its head, its accuracy is the logits-head teacher's.
    expected = expected_hits(case, built, built.fed_test, labels)
    assert expected.admits(result.teacher_accuracy), (
        f"teacher accuracy {result.teacher_accuracy}, but the logits-head reference gets "
        f"{expected.accuracy} ({expected.ties} near-ties)"
    )
    if case.head == "logits" and case.non_finite == "none":
        # A clean logits teacher: exactly the argmax of its reference scores.
        scores = reference(case, built, built.fed_test, case.head)
        correct = int(np.count_nonzero(scores.argmax(-1) == labels))
        assert abs(correct - round(result.teacher_accuracy * len(labels))) <= expected.ties


def _case(**changes: Any) -> Case:
    """A clean job (exact logits teacher, right labels, nothing declared), with ``changes``."""
    clean: dict[str, Any] = {
        "seed": 0,
        "classes": 4,
        "features": 6,
        "samples": 160,
        "image_layout": False,
        "pixels": "none",
        "mlp_hidden": None,
        "head": "logits",
        "features_output": "none",
        "unnamed": False,
        "input_dtype": "float32",
        "batch": None,
        "non_finite": "none",
        "nan_cut": "never",
        "label_shift": 0,
        "naming": "numbered",
        "kind_declaration": "none",
        "wrong_kind_pick": 0,
    }
    return Case(**(clean | changes))


# Each outcome and each path through the preflight at least once, whatever the draw.
EXAMPLES = [
    # Softmax scores as the second of two unnamed outputs: chosen by width, kind detected.
    _case(head="probabilities", features_output="first", unnamed=True, input_dtype="float16"),
    # LogSoftmax with -inf entries, a fixed batch of 1, the graph scaling pixels itself.
    _case(
        head="log_probabilities",
        non_finite="neg_inf_entries",
        features_output="last",
        batch=1,
        input_dtype="float64",
        pixels="in_graph",
        image_layout=True,
    ),
    # Softmax scores with zeros, named outputs, the features first, a fixed batch of 1.
    _case(head="probabilities", non_finite="neg_inf_entries", features_output="first", batch=1),
    # A right kind declared for LogSoftmax scores after unnamed features (`output` declared).
    _case(
        head="log_probabilities",
        kind_declaration="right",
        features_output="first",
        unnamed=True,
        classes=2,
    ),
    # Logits declared as log-probabilities: accepted (the same logits), the declaration kept.
    _case(kind_declaration="wrong", wrong_kind_pick=1, features_output="last", unnamed=True),
    # A fitted MLP teacher fed float16, LogSoftmax scores before unnamed features.
    _case(
        head="log_probabilities",
        mlp_hidden=7,
        input_dtype="float16",
        features_output="last",
        unnamed=True,
        classes=6,
        features=12,
        samples=200,
        image_layout=True,
    ),
    # A declared scale and class names listed in another order; a fitted MLP teacher.
    _case(pixels="declared", naming="by_name", mlp_hidden=12, seed=3, classes=5),
    # A forgotten scale.
    _case(pixels="undeclared", seed=1, classes=3),
    # NaN scores on test samples only (seed 15: the preflight's sample has none).
    _case(head="probabilities", non_finite="nan_rows", nan_cut="train_max", seed=15),
    # NaN scores on the sample.
    _case(non_finite="nan_rows", nan_cut="median"),
    # Labels shifted by one against the teacher's classes.
    _case(label_shift=1, classes=3),
    # A dataset class the teacher does not name.
    _case(naming="missing_name"),
    # Softmax scores declared as logits.
    _case(head="probabilities", kind_declaration="wrong"),
]


def _with_examples(test: Any) -> Any:
    for case in reversed(EXAMPLES):
        test = example(case=case)(test)
    return test


@_with_examples
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=cases())
def test_the_recipe_refuses_with_a_code_or_serves_what_it_reports(case: Case) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        built = build(case, directory)
        expected = expected_outcomes(case, built)
        recipe = DistillationRecipe(
            RecipeInputs(
                job_id="fuzz",
                spec=spec(),
                teachers=[built.teacher],
                data=built.data,
                device=torch.device("cpu"),
                artifact_dir=directory / "artifact",
            ),
            SilentEvents(),
        )
        try:
            output = recipe.run()
        except (PreflightFailed, JobFailure) as failure:
            code = failure.code
            event(f"outcome: {code}")
            assert code in KNOWN_CODES, f"unknown code {code!r}: {failure}"
            assert str(failure.detail).strip(), f"{code} without a detail"
            assert code in expected, f"ended in {code} ({failure.detail}); expected {expected}"
            check_choice(case, recipe, code)
            if getattr(recipe, "preflight", None) is not None:  # refused after the preflight
                check_report(case, built, recipe.preflight)
            return
        event("outcome: success")
        event(f"success: {case.head} head, {case.pixels} pixels, non-finite {case.non_finite}")
        assert "success" in expected, f"succeeded; expected {expected}"
        check_choice(case, recipe, None)
        check_report(case, built, recipe.preflight)
        check_success(case, built, recipe, output.result)
        assert output.paths[ArtifactFormat.ONNX].exists()
        assert output.paths[ArtifactFormat.SAFETENSORS].exists()


# Found by the fuzz test above: declarations made for a teacher whose scores are not the first of
# its unnamed outputs were attached to the first output (the features) at upload, and not carried
# over when the preflight then chose the scores by their width.


def _unnamed_features_first(
    directory: Path, head: Head, declared: TeacherDeclarations
) -> tuple[TeacherRecord, DatasetArrays]:
    """A 3-class nearest-centroid teacher exported with outputs [output_0 = its hidden layer
    (8 wide), output_1 = its scores], and data it classifies well."""
    rng = np.random.default_rng(0)
    centroids = rng.normal(0.0, 3.0, (3, 4)).astype(np.float32)
    y = np.arange(120) % 3
    x = (centroids[y] + rng.normal(0.0, 1.0, (120, 4))).astype(np.float32)
    path = directory / "teacher.onnx"
    write_onnx_teacher(
        centroid_teacher(centroids),
        (4,),
        path,
        head=head,
        scores_name="output_1",
        features="first",
        features_name="output_0",
    )
    data = DatasetArrays(x[30:], y[30:], x[:30], y[:30], ["a", "b", "c"])
    return TeacherRecord.from_file(path, declared=declared), data


def _prepare(directory: Path, head: Head, kind: OutputKind) -> DistillationRecipe:
    """The recipe's preparation (the preflight included) for an unnamed features-first teacher
    uploaded with ``output_kind`` declared."""
    record, data = _unnamed_features_first(directory, head, TeacherDeclarations(output_kind=kind))
    recipe = DistillationRecipe(
        RecipeInputs(
            job_id="fuzz",
            spec=spec(),
            teachers=[record],
            data=data,
            device=torch.device("cpu"),
            artifact_dir=directory / "artifact",
        )
    )
    recipe.prepare()
    return recipe


def test_a_right_output_kind_declaration_is_kept_when_the_scores_are_chosen_by_width() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = _prepare(Path(tmp), "probabilities", OutputKind.PROBABILITIES)
        check = recipe.preflight.teachers[0]
        assert check.output == "output_1"
        assert check.output_kind is OutputKind.PROBABILITIES and check.kind_by == "declared"


def test_a_wrong_probabilities_declaration_is_refused_when_the_scores_are_chosen_by_width() -> None:
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(PreflightFailed) as refused:
        _prepare(Path(tmp), "log_probabilities", OutputKind.PROBABILITIES)
    assert refused.value.code == "output_kind_mismatch"


def test_class_names_can_be_declared_when_the_scores_are_not_the_first_output() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        record, _ = _unnamed_features_first(
            Path(tmp), "logits", TeacherDeclarations(classes=["a", "b", "c"])
        )
        assert record.signature.scores.name == "output_1"
        assert record.signature.scores.classes == ["a", "b", "c"]
