"""Contract of the teacher-format registry: every format recognises, inspects and opens its own
files, and twins in different formats are the same teacher."""

import json

import numpy as np
import torch

from app.datasets.loading import load_builtin
from app.ml.signature import OutputKind
from app.ml.teacher_formats import FORMATS, inspect_teacher
from app.ml.teacher_formats.base import as_logits
from tests.helpers.teachers import TeacherFiles


def test_each_format_recognises_inspects_and_opens_its_files(
    digits_teacher: TeacherFiles,
) -> None:
    files = {
        "onnx": (digits_teacher.onnx, None),
        "safetensors": (digits_teacher.safetensors, json.dumps(digits_teacher.config)),
    }
    assert set(FORMATS) == set(files)
    x = load_builtin("builtin:digits").x_test
    logits = {}
    for name, teacher_format in FORMATS.items():
        assert teacher_format.name == name
        path, config = files[name]
        info = inspect_teacher(path, path.name, config)
        assert info.format == name
        assert info.signature.input_shape == (1, 8, 8) and info.signature.num_classes == 10
        assert info.parameter_count == 64 * 64 + 64 + 64 * 10 + 10
        with open(path, "rb") as f:
            head = f.read(16)
        first_match = next(f for f in FORMATS.values() if f.sniff(head, path.stat().st_size))
        assert first_match is teacher_format  # the registry order finds each format
        backend = teacher_format.open(path, info.signature, info.architecture, torch.device("cpu"))
        logits[name] = backend.logits(x, batch_size=100)
        assert logits[name].shape == (len(x), 10) and logits[name].dtype == np.float32
        assert backend.latency_ms() > 0
    np.testing.assert_allclose(logits["onnx"], logits["safetensors"], atol=1e-4)
    accuracy = (logits["onnx"].argmax(1) == load_builtin("builtin:digits").y_test).mean()
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
