"""ONNX in and out: a torch model exported as one self-contained graph, and a graph's latency.

Students are exported here, and safetensors teachers too when their latency is measured, so the
two are always timed on the same runtime.
"""

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from app.config import get_settings
from app.ml.signature import ModelSignature

if TYPE_CHECKING:
    import onnxruntime as ort


def export_onnx(model: nn.Module, signature: ModelSignature, path: Path) -> None:
    """One self-contained ONNX file named after the signature, with a dynamic batch dimension."""
    model = model.cpu().eval()
    example = torch.zeros(2, *signature.input_shape)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[signature.inputs[0].name],
        output_names=[signature.scores.name],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        verbose=False,
    )


ORT_TYPES: dict[str, type[np.floating[Any]]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def onnx_input(session: "ort.InferenceSession") -> tuple[str, type[np.floating[Any]], int | None]:
    """The first input's name, numpy float type, and batch size when the graph fixes it."""
    node = session.get_inputs()[0]
    batch = node.shape[0] if node.shape and isinstance(node.shape[0], int) else None
    return node.name, ORT_TYPES[node.type], batch


def onnx_latency_ms(
    path: Path, signature: ModelSignature, runs: int = 200, budget_s: float | None = None
) -> float:
    """Median latency in milliseconds of answering one sample, with onnxruntime on one CPU
    thread: one sample's run, or one whole batch's where the graph fixes its batch size.

    At most ``runs`` timed runs after 10 warm-up runs, and no more than ``budget_s`` seconds of
    them in all (default ``latency_budget_s``; at least 3 timed runs), so a slow teacher is timed
    on fewer runs instead of holding its job for minutes. Teacher and student are both measured
    this way, so the ratio compares models, not runtimes.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name, dtype, batch = onnx_input(session)
    shape = (batch or 1, *signature.input_shape)
    sample = np.random.default_rng(0).random(shape, dtype=np.float32).astype(dtype)
    deadline = time.perf_counter() + (budget_s or get_settings().latency_budget_s)
    for _ in range(10):
        session.run(None, {name: sample})
        if time.perf_counter() > deadline:
            break
    timings: list[float] = []
    while len(timings) < runs and (len(timings) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        session.run(None, {name: sample})
        timings.append(time.perf_counter() - start)
    return float(np.median(timings) * 1000.0)
