"""A text distillation in process: a tiny trained BERT teacher (a Hugging Face archive) on
labelled sentences, into a transformer started from its layers and into a text CNN. The
exported ONNX student, fed raw sentences through the artifact's tokenizer, reproduces the
accuracy the job reports."""

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from app.datasets.text import TextRecords
from app.jobs.features import attention_transfer_student, default_text_pairs
from app.jobs.methods import AttentionKL, HiddenStates
from app.jobs.schemas import DistillationSpec
from app.ml.artifacts import read_manifest
from app.ml.students import TransformerSpec, resolve_student
from app.ml.text import TextTokenizer
from app.models import ArtifactFormat
from tests.helpers.text_teachers import synthetic_sentiment
from worker.recipe import DistillationRecipe, RecipeInputs, RecipeOutput, SilentEvents
from worker.teachers import TeacherRecord

CLASSES = ["negative", "positive"]


@pytest.fixture(scope="module")
def teacher(text_teacher_zip: Path) -> TeacherRecord:
    return TeacherRecord.from_file(text_teacher_zip)


def records(long_test_text: bool = False) -> TextRecords:
    train, train_labels = synthetic_sentiment(600, seed=1)
    test, test_labels = synthetic_sentiment(200, seed=2)
    if long_test_text:
        test[0] = " ".join(["the movie was good"] * 60)  # far beyond max_length tokens
    return TextRecords(
        texts_train=train,
        pairs_train=None,
        y_train=np.asarray(train_labels),
        texts_test=test,
        pairs_test=None,
        y_test=np.asarray(test_labels),
        classes=CLASSES,
    )


def run(
    teacher: TeacherRecord, student: dict[str, object], tmp_path: Path, data: TextRecords
) -> RecipeOutput:
    spec = DistillationSpec.model_validate(
        {
            "teacher": teacher.id,
            "dataset": "d",
            "student": student,
            "training": {"epochs": 4, "batch_size": 32, "learning_rate": 2e-3, "seed": 0},
        }
    )
    spec.student = resolve_student(spec.student, teacher.architecture)
    return DistillationRecipe(
        RecipeInputs(
            job_id="j",
            spec=spec,
            teachers=[teacher],
            data=data,
            device=torch.device("cpu"),
            artifact_dir=tmp_path / "artifact",
            cache_dir=tmp_path / "cache",
            token_cache_dir=tmp_path / "tokens",
        )
    ).run()


def served_accuracy(artifact: Path, data: TextRecords) -> float:
    """The ONNX student on the raw test sentences, tokenised by the artifact's tokenizer."""
    manifest = read_manifest(artifact)
    tokenizer = TextTokenizer.from_file(
        artifact / "tokenizer.json",
        manifest.signature.preprocessing,  # type: ignore[arg-type]
    )
    session = ort.InferenceSession(str(artifact / "model.onnx"))
    names = [node.name for node in session.get_inputs()]
    inputs, _ = tokenizer.encode(data.texts_test)
    (logits,) = session.run(["logits"], inputs.feed(names))
    labels = [manifest.classes[i] for i in logits.argmax(axis=1)]
    return float(
        np.mean([label == CLASSES[y] for label, y in zip(labels, data.y_test, strict=True)])
    )


def test_transformer_student_from_teacher_layers(teacher: TeacherRecord, tmp_path: Path) -> None:
    data = records(long_test_text=True)
    output = run(teacher, {"architecture": "transformer", "num_layers": 1}, tmp_path, data)
    result = output.result
    assert result.teacher_accuracy > 0.9
    assert result.student_accuracy >= 0.9 * result.teacher_accuracy
    assert result.student_init is not None and "teacher layers [1]" in result.student_init
    assert result.student_parameters < result.teacher_parameters
    assert result.latency_tokens == 64
    assert result.student_latency_batch32_ms and result.teacher_latency_batch32_ms
    assert result.truncated_records == 1
    assert [w.code for w in result.warnings if w.code == "texts_truncated"] == ["texts_truncated"]
    assert result.int8_method == "dynamic" and result.int8_accuracy is not None
    assert {ArtifactFormat.ONNX, ArtifactFormat.TOKENIZER, ArtifactFormat.ONNX_INT8} <= set(
        output.paths
    )
    # What a user gets from the served student is what the job reported.
    assert served_accuracy(tmp_path / "artifact", data) == pytest.approx(result.student_accuracy)


def test_text_cnn_student_and_the_token_cache(teacher: TeacherRecord, tmp_path: Path) -> None:
    data = records()
    output = run(teacher, {"architecture": "text_cnn", "channels": 64}, tmp_path, data)
    result = output.result
    assert result.student_init == "word embeddings copied from the teacher"
    assert result.student_accuracy >= 0.85 * result.teacher_accuracy
    assert served_accuracy(tmp_path / "artifact", data) == pytest.approx(result.student_accuracy)
    assert len(list((tmp_path / "tokens").glob("*.npz"))) == 1
    # A second job on the same records and tokenizer reads the token ids back, same result.
    again = run(teacher, {"architecture": "text_cnn", "channels": 64}, tmp_path, data)
    assert again.result.teacher_outputs_cached
    assert again.result.student_accuracy == result.student_accuracy


class Recorder(SilentEvents):
    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        self.epochs.append(values)


@pytest.mark.parametrize(
    ("method", "term"),
    [("hidden_states", "train_hidden_loss"), ("attention_kl", "train_attention_kl")],
)
def test_transformer_layer_methods_train_with_the_teacher_online(
    teacher: TeacherRecord, tmp_path: Path, method: str, term: str
) -> None:
    """TinyBERT's hidden states and MiniLM's attention: the teacher runs beside the student on
    every batch; the matched term falls as the student learns."""
    spec = DistillationSpec.model_validate(
        {
            "teacher": teacher.id,
            "dataset": "d",
            "student": {"architecture": "transformer", "num_layers": 1, "init": "random"},
            "distillation": {"method": method},
            "training": {"epochs": 3, "batch_size": 32, "learning_rate": 2e-3, "seed": 0},
        }
    )
    spec.student = resolve_student(spec.student, teacher.architecture)
    assert isinstance(spec.distillation, HiddenStates | AttentionKL)
    spec.distillation.layers = default_text_pairs(
        spec.distillation, int((teacher.architecture or {})["num_hidden_layers"]), 1
    )
    assert isinstance(spec.student, TransformerSpec)
    spec.student = attention_transfer_student(spec.distillation, spec.student)
    events = Recorder()
    output = DistillationRecipe(
        RecipeInputs(
            job_id="j",
            spec=spec,
            teachers=[teacher],
            data=records(),
            device=torch.device("cpu"),
            artifact_dir=tmp_path / "artifact",
        ),
        events,
    ).run()
    terms = [epoch[term] for epoch in events.epochs]
    assert all(math.isfinite(t) for t in terms)
    assert terms[-1] < terms[0]
    assert output.result.student_accuracy > 0.8
