"""ONNX in and out: a torch model exported as one self-contained graph, and a graph's latency.

Students are exported here, and torch teachers (safetensors, Hugging Face) too when their latency
is measured, so the two are always timed on the same runtime.
"""

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from app.config import get_settings
from app.ml.signature import ModelSignature
from app.ml.text import LATENCY_TOKENS, SEQUENCE, is_text

if TYPE_CHECKING:
    import onnxruntime as ort


def example_inputs(
    signature: ModelSignature, batch: int, length: int = LATENCY_TOKENS
) -> dict[str, np.ndarray]:
    """Inputs for ``signature`` by name: float32 noise for a fixed-shape input; for text, records
    of ``length`` tokens (id 1, present in every vocabulary), all real (mask 1), one segment."""
    if is_text(signature):
        return {
            spec.name: np.zeros((batch, length), np.int64)
            if spec.name == "token_type_ids"
            else np.ones((batch, length), np.int64)
            for spec in signature.inputs
        }
    rng = np.random.default_rng(0)
    return {signature.inputs[0].name: rng.random((batch, *signature.input_shape), np.float32)}


def export_onnx(model: nn.Module, signature: ModelSignature, path: Path) -> None:
    """One self-contained ONNX file with the signature's input and output names and a dynamic
    batch dimension (for text, dynamic ``batch`` and ``sequence`` dimensions on every input)."""
    model = model.cpu().eval()
    batch = torch.export.Dim("batch")
    if is_text(signature):
        sequence = torch.export.Dim(SEQUENCE, max=4096)
        example = tuple(torch.from_numpy(a) for a in example_inputs(signature, 2, 8).values())
        dynamic: tuple[dict[int, object], ...] = tuple({0: batch, 1: sequence} for _ in example)
    else:
        example = (torch.zeros(2, *signature.input_shape),)
        dynamic = ({0: batch},)
    torch.onnx.export(
        model,
        example,
        str(path),
        input_names=[spec.name for spec in signature.inputs],
        output_names=[signature.scores.name],
        dynamic_shapes=dynamic,
        external_data=False,
        verbose=False,
    )


ORT_TYPES: dict[str, type[np.floating[Any]]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}
ORT_INTEGER_TYPES: dict[str, type[np.integer[Any]]] = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
NumpyType = type[np.floating[Any]] | type[np.integer[Any]]
ORT_ALL_TYPES: dict[str, NumpyType] = {**ORT_TYPES, **ORT_INTEGER_TYPES}


def onnx_input(
    session: "ort.InferenceSession",
) -> tuple[str, NumpyType, int | None]:
    """The first input's name, numpy type, and batch size when the graph fixes it."""
    node = session.get_inputs()[0]
    batch = node.shape[0] if node.shape and isinstance(node.shape[0], int) else None
    return node.name, ORT_ALL_TYPES[node.type], batch


def onnx_latency_ms(
    path: Path,
    signature: ModelSignature,
    runs: int = 200,
    budget_s: float | None = None,
    batch: int = 1,
) -> float:
    """Median latency in milliseconds of answering ``batch`` samples (text: of
    ``LATENCY_TOKENS`` tokens each), with onnxruntime on one CPU thread; one whole batch's where
    the graph fixes its batch size.

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
    fixed_batch = onnx_input(session)[2]
    by_name = example_inputs(signature, fixed_batch or batch)
    types = {node.name: node.type for node in session.get_inputs()}
    feed = {
        name: array.astype(ORT_ALL_TYPES.get(types[name], array.dtype.type))
        for name, array in zip(types, by_name.values(), strict=True)
    }
    deadline = time.perf_counter() + (budget_s or get_settings().latency_budget_s)
    for _ in range(10):
        session.run(None, feed)
        if time.perf_counter() > deadline:
            break
    timings: list[float] = []
    while len(timings) < runs and (len(timings) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        session.run(None, feed)
        timings.append(time.perf_counter() - start)
    return float(np.median(timings) * 1000.0)


def torch_latency_ms(model: nn.Module, signature: ModelSignature, batch: int = 1) -> float:
    """A torch model timed as an ONNX graph is (``onnx_latency_ms``): exported to a temporary
    file first. The export leaves the model on the CPU."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, signature, path)
        return onnx_latency_ms(path, signature, batch=batch)
