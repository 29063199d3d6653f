"""ONNX text classifiers in a Hugging Face folder (Optimum's layout: ``model.onnx``, the tokenizer,
``config.json``): inspected into a text signature by a sandboxed trial, opened into a backend
that answers as the torch model it was exported from, refused clearly where a graph does not fit
or a method needs the transformers weights; and distilled into a text CNN."""

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from app.errors import InvalidSpec
from app.jobs.features import resolve_text_layer_pairs
from app.jobs.methods import HiddenStates
from app.ml.onnx_io import export_onnx
from app.ml.signature import Datatype, ModelSignature, OutputSpec, TensorSpec, TextPreprocessing
from app.ml.students import TextCnnSpec, TransformerSpec, resolve_student
from app.ml.teacher_formats import FORMATS, TeacherInfo, inspect_teacher
from app.ml.teacher_formats.huggingface import _Logits
from app.ml.teacher_formats.onnx_text import OnnxTextTeacher
from app.ml.text import text_model_signature
from app.models import Teacher
from tests.app.test_hf_teachers import bert_parameters, refused, upload
from tests.helpers.text_teachers import synthetic_sentiment, zip_dir
from tests.worker.test_text_recipe import records, run
from worker.teachers import TeacherRecord

COPIED = ("tokenizer.json", "tokenizer_config.json", "config.json")


def export_bert(source: Path, path: Path) -> Path:
    """The ``save_pretrained`` classifier at ``source`` as one ONNX graph at ``path``, inputs and
    output as Optimum names them, batch and sequence dynamic."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(source)
    signature = text_model_signature(
        2,
        preprocessing=TextPreprocessing(tokenizer="tokenizer.json", max_length=128, pad_token_id=0),
        token_type_ids=True,
    )
    export_onnx(_Logits(model), signature, path)
    return path


def onnx_folder(source: Path, directory: Path, files: tuple[str, ...] = COPIED) -> Path:
    """An Optimum-style folder: the graph exported from ``source`` and its ``files``."""
    directory.mkdir(parents=True)
    export_bert(source, directory / "model.onnx")
    for name in files:
        shutil.copy(source / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def onnx_dir(text_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return onnx_folder(text_teacher_dir, tmp_path_factory.mktemp("onnx-text") / "model")


@pytest.fixture(scope="module")
def onnx_zip(onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return zip_dir(onnx_dir, tmp_path_factory.mktemp("onnx-text-zip") / "onnx-teacher.zip")


@pytest.fixture(scope="module")
def onnx_info(onnx_zip: Path) -> TeacherInfo:
    return inspect_teacher(onnx_zip, onnx_zip.name, None)


def test_onnx_folder_is_inspected(
    client: TestClient, text_teacher_dir: Path, onnx_zip: Path
) -> None:
    response = upload(client, onnx_zip)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "huggingface"
    signature = body["signature"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in signature["inputs"]] == [
        ("input_ids", "INT64", ["sequence"]),
        ("attention_mask", "INT64", ["sequence"]),
        ("token_type_ids", "INT64", ["sequence"]),
    ]
    assert signature["preprocessing"] == {
        "kind": "text",
        "tokenizer": "tokenizer.json",
        "max_length": 128,
        "pad_token_id": 0,
        "pairs": False,
    }
    assert signature["outputs"][0]["classes"] == ["negative", "positive"]
    assert body["scores_choice"]["output"] == "logits"
    # The graph's weights are the model's, and the few float scalars the export makes
    # initializers of (the attention's scale, the mask's fill value).
    assert 0 <= body["parameter_count"] - bert_parameters(text_teacher_dir) < 8
    assert body["feature_layers"] == []
    architecture = body["architecture"]
    assert architecture["model_type"] == "bert" and architecture["vocab_size"] > 0
    assert architecture["distill"] == {"max_positions": 128, "runtime": "onnx"}


def test_backend_answers_as_the_torch_model(
    text_teacher_dir: Path, onnx_zip: Path, onnx_info: TeacherInfo
) -> None:
    from transformers import BertForSequenceClassification

    backend = FORMATS["huggingface"].open(
        onnx_zip, onnx_info.signature, onnx_info.architecture, torch.device("cpu")
    )
    assert isinstance(backend, OnnxTextTeacher) and backend.tokenizer.max_length == 128
    texts, labels = synthetic_sentiment(64, seed=3)
    inputs, _ = backend.tokenizer.encode(texts)
    logits = backend.logits(inputs, batch_size=16)  # batches of their own lengths
    reference = BertForSequenceClassification.from_pretrained(text_teacher_dir).eval()
    with torch.no_grad():
        expected = reference(**{k: torch.from_numpy(v) for k, v in inputs.arrays.items()}).logits
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)
    assert (logits.argmax(1) == np.array(labels)).mean() > 0.9
    assert backend.latency_ms() > 0
    with pytest.raises(NotImplementedError):
        backend.weights()
    with pytest.raises(ValueError, match="no layers"):
        backend.run(inputs[np.arange(2)], ["hidden_states.1"])


def test_without_config_there_are_no_class_names(text_teacher_dir: Path, tmp_path: Path) -> None:
    directory = onnx_folder(
        text_teacher_dir, tmp_path / "model", ("tokenizer.json", "tokenizer_config.json")
    )
    info = inspect_teacher(zip_dir(directory, tmp_path / "t.zip"), "t.zip", None)
    assert info.signature.scores.classes is None and info.signature.num_classes == 2
    assert info.architecture == {"distill": {"max_positions": 128, "runtime": "onnx"}}


class FloatInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.linear(x)
        return result


def test_refusals(
    client: TestClient, text_teacher_dir: Path, onnx_dir: Path, tmp_path: Path
) -> None:
    # A graph of floats beside a tokenizer and a config.
    floats = tmp_path / "floats"
    floats.mkdir()
    for name in COPIED:
        shutil.copy(onnx_dir / name, floats / name)
    vector = ModelSignature(
        inputs=[TensorSpec(name="input", datatype=Datatype.FP32, shape=[4])],
        outputs=[OutputSpec(name="logits", shape=[2])],
    )
    export_onnx(FloatInputs(), vector, floats / "model.onnx")
    problem = refused(
        client, zip_dir(floats, tmp_path / "floats.zip"), 422, "not_a_text_classifier"
    )
    assert "input_ids" in problem["detail"]
    # A graph without its tokenizer.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(onnx_dir / "model.onnx", bare / "model.onnx")
    shutil.copy(onnx_dir / "config.json", bare / "config.json")
    refused(client, zip_dir(bare, tmp_path / "bare.zip"), 422, "no_tokenizer")
    # Tensors kept in an external data file.
    external = tmp_path / "external"
    external.mkdir()
    for name in COPIED:
        shutil.copy(onnx_dir / name, external / name)
    onnx.save_model(
        onnx.load_model(str(onnx_dir / "model.onnx")),
        str(external / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    refused(client, zip_dir(external, tmp_path / "external.zip"), 422, "external_data")


def test_what_needs_the_transformers_weights_is_refused(onnx_info: TeacherInfo) -> None:
    architecture: dict[str, Any] | None = onnx_info.architecture
    student = resolve_student(TransformerSpec(num_layers=1), architecture)
    assert isinstance(student, TransformerSpec) and student.init == "random"
    with pytest.raises(ValueError, match="ONNX teacher gives no weights"):
        resolve_student(TransformerSpec(num_layers=1, init="teacher_layers"), architecture)
    cnn = resolve_student(TextCnnSpec(), architecture)
    assert isinstance(cnn, TextCnnSpec) and cnn.init == "random" and cnn.vocab_size
    with pytest.raises(ValueError, match="ONNX teacher gives no weights"):
        resolve_student(TextCnnSpec(init="teacher_embeddings"), architecture)
    with pytest.raises(InvalidSpec, match="ONNX teacher does not give"):
        resolve_text_layer_pairs(
            HiddenStates(method="hidden_states"), Teacher(architecture=architecture), student
        )


def test_distilled_into_a_text_cnn(onnx_zip: Path, tmp_path: Path) -> None:
    teacher = TeacherRecord.from_file(onnx_zip)
    data = records()
    output = run(teacher, {"architecture": "text_cnn", "channels": 64}, tmp_path, data)
    result = output.result
    assert result.student_init == "random"
    assert result.teacher_accuracy > 0.9
    assert result.student_accuracy >= 0.85 * result.teacher_accuracy
    assert result.teacher_latency_batch32_ms
