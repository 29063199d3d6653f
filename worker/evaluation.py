"""Figures of merit for a student against its teacher: accuracy, agreement, latency."""

import time
from pathlib import Path

import numpy as np
import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of samples on which student and teacher predict the same class."""
    return (student_logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)).float().mean().item()


def onnx_latency_ms(path: Path, input_shape: tuple[int, ...], runs: int = 200) -> float:
    """Median single-sample latency with onnxruntime on one CPU thread.

    Teacher and student are both measured this way, so the ratio compares models, not runtimes.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    sample = np.random.default_rng(0).random((1, *input_shape), dtype=np.float32)
    for _ in range(10):
        session.run(None, {name: sample})
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: sample})
        timings.append(time.perf_counter() - start)
    return float(np.median(timings) * 1000.0)
