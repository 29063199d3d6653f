"""The student quantised to int8 with onnxruntime's quantisation tool.

Following onnxruntime's guide
(https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html): the float32
graph is pre-processed first (``quant_pre_process``: shape inference and graph optimisation);
then **dynamic** quantisation (weights int8 ahead of time, activations scaled per batch at run
time) for families made of matrix products, and **static** quantisation (activation ranges fixed
by calibration on validation samples, QDQ format, per-channel weights) for convnets, which the
guide recommends for CNNs. Each student family says which (``StudentFamily.int8``).
"""

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from app.ml.onnx_io import onnx_input, onnx_latency_ms
from app.ml.signature import ModelSignature
from app.ml.students.base import QuantMethod
from app.ml.teacher_formats.base import ModelInputs
from app.ml.text import TokenizedInputs, is_text

CALIBRATION_SAMPLES = 512  # at most; onnxruntime's examples calibrate on a few hundred
CALIBRATION_BATCH = 32
PREDICT_BATCH = 1024


@dataclass(frozen=True)
class Int8Figures:
    """The int8 student next to the float32 one, both run with onnxruntime on the test split."""

    method: QuantMethod
    accuracy: float
    agreement: float  # fraction of test samples where int8 and float32 students agree
    latency_ms: float
    size_bytes: int
    speedup: float  # float32 student latency / int8 student latency


class ArrayCalibrationReader(CalibrationDataReader):  # type: ignore[misc]
    """onnxruntime's ``CalibrationDataReader`` over an array ``[N, *input_shape]``, in batches of
    ``CALIBRATION_BATCH`` fed as ``input_name``."""

    def __init__(self, input_name: str, x: np.ndarray) -> None:
        self.input_name, self.x = input_name, np.ascontiguousarray(x, dtype=np.float32)
        self.batches: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)

    def rewind(self) -> None:
        self.batches = iter(
            {self.input_name: self.x[i : i + CALIBRATION_BATCH]}
            for i in range(0, len(self.x), CALIBRATION_BATCH)
        )


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Plain ``Gemm`` nodes (alpha = beta = 1, A not transposed, B a constant weight) as
    ``MatMul`` then ``Add``, in place: onnxruntime's dynamic quantisation handles ``MatMul`` but
    not ``Gemm``, and torch exports ``nn.Linear`` on flat inputs as ``Gemm``."""
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        b = node.input[1] if len(node.input) > 1 else ""
        plain = (
            node.op_type == "Gemm"
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
            and not attrs.get("transA", 0)
            and b in weights
            and uses[b] == 1
        )
        if not plain:
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            weight = numpy_helper.to_array(weights[b])
            weights[b].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight.T), b))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(
            onnx.helper.make_node("MatMul", [node.input[0], b], [product], f"{node.name}_matmul")
        )
        if has_bias:
            nodes.append(
                onnx.helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], f"{node.name}_add"
                )
            )
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def quantize_student(
    float_path: Path,
    int8_path: Path,
    method: QuantMethod,
    calibration: ModelInputs,
    *,
    symbolic_shapes: bool = True,
) -> None:
    """Write ``float_path``'s graph quantised to int8 at ``int8_path``. ``calibration``
    (``[N, *input_shape]``, float32) sets the activation ranges of static quantisation; dynamic
    quantisation needs none.

    Weights are signed int8 per output channel (per-channel, as the guide suggests for accuracy);
    static activations are signed int8 in QDQ format (the guide's first choice, S8S8); dynamic
    activations are uint8 (``DynamicQuantizeLinear`` always is). ``symbolic_shapes=False``
    skips the pre-processing's symbolic shape inference, which cannot follow a transformer's
    attention through symbolic batch and sequence dimensions (the guide's advice for them).
    """
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        source = float_path
        if not symbolic_shapes:
            # The exporter's recorded intermediate shapes can disagree with what onnx's own
            # shape inference finds along symbolic dimensions: let it find them afresh.
            model = onnx.load(str(float_path))
            del model.graph.value_info[:]
            source = Path(tmp) / "float.onnx"
            onnx.save(model, str(source))
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=not symbolic_shapes)
        if method == "dynamic":
            # After the pre-processing, whose optimiser would fuse MatMul + Add back into Gemm.
            onnx.save(gemm_to_matmul(onnx.load(str(prepared))), str(prepared))
            quantize_dynamic(prepared, int8_path, per_channel=True, weight_type=QuantType.QInt8)
        else:
            assert isinstance(calibration, np.ndarray)  # static: convnets on arrays
            input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
            quantize_static(
                prepared,
                int8_path,
                ArrayCalibrationReader(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
            )


def onnx_predictions(path: Path, x: ModelInputs) -> np.ndarray:
    """Class indices (argmax of the first output) of the ONNX graph at ``path`` for ``x``, with
    onnxruntime on the CPU, ``PREDICT_BATCH`` samples at a time (text: records of similar
    lengths together, each batch padded to its longest)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if isinstance(x, TokenizedInputs):
        names = [node.name for node in session.get_inputs()]
        order = np.argsort(x.lengths, kind="stable")
        result = np.zeros(len(x), np.int64)
        for i in range(0, len(x), PREDICT_BATCH):
            rows = order[i : i + PREDICT_BATCH]
            result[rows] = np.asarray(session.run(None, x[rows].feed(names))[0]).argmax(axis=1)
        return result
    name, dtype, _ = onnx_input(session)
    predictions = [
        np.asarray(session.run(None, {name: x[i : i + PREDICT_BATCH].astype(dtype)})[0]).argmax(
            axis=1
        )
        for i in range(0, len(x), PREDICT_BATCH)
    ]
    return np.concatenate(predictions) if predictions else np.zeros(0, np.int64)


def int8_student(
    float_path: Path,
    int8_path: Path,
    method: QuantMethod,
    signature: ModelSignature,
    calibration: ModelInputs,
    test_x: ModelInputs,
    test_labels: np.ndarray,
    float_latency_ms: float,
) -> Int8Figures:
    """Quantise the float32 student at ``float_path`` to ``int8_path`` by ``method`` (its
    family's ``StudentFamily.int8``; static: calibrated on at most ``CALIBRATION_SAMPLES`` of
    ``calibration``), then measure it on the test split and time it as the float32 student is
    timed (``onnx_latency_ms``).

    Raises whatever quantisation raises; ``int8_path`` may then hold a partial file.
    """
    quantize_student(
        float_path,
        int8_path,
        method,
        calibration[:CALIBRATION_SAMPLES],
        symbolic_shapes=not is_text(signature),
    )
    predicted = onnx_predictions(int8_path, test_x)
    reference = onnx_predictions(float_path, test_x)
    latency = onnx_latency_ms(int8_path, signature)
    return Int8Figures(
        method=method,
        accuracy=float((predicted == test_labels).mean()),
        agreement=float((predicted == reference).mean()),
        latency_ms=latency,
        size_bytes=int8_path.stat().st_size,
        speedup=float_latency_ms / latency,
    )
