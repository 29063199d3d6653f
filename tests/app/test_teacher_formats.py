"""Contract of the teacher-format registry: every format recognises, inspects and opens its own
files, and twins in different formats are the same teacher."""

import json
from pathlib import Path

import numpy as np
import torch

from app.datasets.loading import load_builtin
from app.ml.archives import SNIFF_BYTES
from app.ml.signature import OutputKind
from app.ml.teacher_formats import FORMATS, inspect_teacher
from app.ml.teacher_formats.base import as_logits
from app.ml.text import is_text
from tests.helpers.teachers import TeacherFiles
from tests.helpers.text_teachers import synthetic_sentiment


def test_each_format_recognises_inspects_and_opens_its_files(
    digits_teacher: TeacherFiles, text_teacher_zip: Path
) -> None:
    """Contract: every registered format is found by sniffing in registry order, inspected and
    opened, and its backend runs on the inputs its signature takes."""
    files = {
        "onnx": (digits_teacher.onnx, None),
        "safetensors": (digits_teacher.safetensors, json.dumps(digits_teacher.config)),
        "huggingface": (text_teacher_zip, None),
    }
    assert set(FORMATS) == set(files)
    digits = load_builtin("builtin:digits")
    texts, labels = synthetic_sentiment(100, 7)
    logits = {}
    for name, teacher_format in FORMATS.items():
        assert teacher_format.name == name
        path, config = files[name]
        info = inspect_teacher(path, path.name, config)
        assert info.format == name
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
        first_match = next(f for f in FORMATS.values() if f.sniff(head, path.stat().st_size))
        assert first_match is teacher_format  # the registry order finds each format
        backend = teacher_format.open(path, info.signature, info.architecture, torch.device("cpu"))
        if is_text(info.signature):
            assert backend.tokenizer is not None
            inputs, _ = backend.tokenizer.encode(texts)
            scores = backend.logits(inputs, batch_size=16)
            assert scores.shape == (100, 2) and (scores.argmax(1) == labels).mean() > 0.9
        else:
            assert info.signature.input_shape == (1, 8, 8) and info.signature.num_classes == 10
            assert info.parameter_count == 64 * 64 + 64 + 64 * 10 + 10
            logits[name] = backend.logits(digits.x_test, batch_size=100)
            assert logits[name].shape == (len(digits.x_test), 10)
            assert logits[name].dtype == np.float32
        assert backend.latency_ms() > 0
    np.testing.assert_allclose(logits["onnx"], logits["safetensors"], atol=1e-4)
    accuracy = (logits["onnx"].argmax(1) == digits.y_test).mean()
    assert accuracy == digits_teacher.test_accuracy


def test_probabilities_and_log_probabilities_become_logits() -> None:
    """softmax(as_logits(scores)) gives the teacher's distribution back, whatever its kind."""
    logits = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    probabilities = torch.softmax(torch.from_numpy(logits), -1).numpy()
    probabilities[0] = [1.0, 0.0, 0.0, 0.0, 0.0]  # a certain teacher: log 0 is floored, finite
    for kind, scores in (
        (OutputKind.PROBABILITIES, probabilities),
        (OutputKind.LOG_PROBABILITIES, np.log(probabilities + 1e-30)),
    ):
        converted = as_logits(scores, kind)
        assert np.isfinite(converted).all()
        back = torch.softmax(torch.from_numpy(converted).double(), -1).numpy()
        np.testing.assert_allclose(back, probabilities, atol=1e-6)
    np.testing.assert_array_equal(as_logits(logits, OutputKind.LOGITS), logits)
