"""ONNX teachers: checked and run by onnxruntime, with no custom-op libraries ever registered.

The signature comes from the graph's one input (float32, float16 or float64: Distill casts what
it feeds) and its outputs: every ``[batch, N]`` float output can be the class scores (which one
is chosen by ``apply_declarations``); every float output but the scores is a feature layer.
A batch dimension the graph fixes (an export traced with one example) is honoured by running
batches of exactly that size.

Inspecting never runs the graph in the API's process (even its constant subgraphs: the session
that reads the signature has graph optimizations off); the graph is run once on zeros in a
separate process under the trial's time and memory limits (``app.ml.sandbox``).
"""

import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from app.config import get_settings
from app.errors import InvalidModel
from app.ml.layers import FeatureLayer
from app.ml.onnx_io import ORT_TYPES, onnx_input, onnx_latency_ms
from app.ml.sandbox import (
    TrialFailed,
    TrialOutOfMemory,
    TrialTimeout,
    onnx_output_shapes,
    run_isolated,
)
from app.ml.signature import MAX_RANK, Datatype, ModelSignature, OutputSpec, TensorSpec
from app.ml.teacher_formats.base import (
    ModelInputs,
    ScoresChoice,
    TeacherBackend,
    TeacherInfo,
)
from app.ml.teacher_formats.onnx_errors import explain_load_error, explain_parse_error

if TYPE_CHECKING:
    import onnx

DATATYPES = {
    "tensor(float)": Datatype.FP32,
    "tensor(float16)": Datatype.FP16,
    "tensor(double)": Datatype.FP64,
}


def _static_dims(shape: list[Any], what: str) -> list[int]:
    if not all(isinstance(d, int) and d > 0 for d in shape) or len(shape) > MAX_RANK:
        raise InvalidModel(
            f"The model's {what} must have fixed sizes beyond the batch dimension (at most "
            f"{MAX_RANK} of them); got {shape}."
        )
    return list(shape)


def _fixed(shape: list[Any]) -> bool:
    return all(isinstance(d, int) and d > 0 for d in shape)


def _subgraphs(node: "onnx.NodeProto") -> list["onnx.GraphProto"]:
    """The bodies a node holds (Loop and Scan bodies, If branches)."""
    import onnx

    graphs: list[onnx.GraphProto] = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            graphs.append(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attribute.graphs)
    return graphs


def _used_parameters(graph: "onnx.GraphProto") -> tuple[int, set[str]]:
    """The weights (float initializer elements) of ``graph`` and of the bodies nested in it that
    some node reads, and the names ``graph``'s nodes read from the scopes around it.

    A node reads its inputs, and what the bodies it holds read from outside themselves; a body's
    own inputs, initializers and node outputs shadow the outer names. Integer initializers are
    shapes and indices, not weights; an initializer no node reads is never even loaded."""
    import onnx

    float_types = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    }
    parameters, reads = 0, set[str]()
    for node in graph.node:
        reads.update(name for name in node.input if name)
        for body in _subgraphs(node):
            body_parameters, body_reads = _used_parameters(body)
            parameters += body_parameters
            reads |= body_reads
    parameters += sum(
        math.prod(t.dims)
        for t in graph.initializer
        if t.data_type in float_types and t.name in reads
    )
    defined = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    defined.update(name for node in graph.node for name in node.output)
    return parameters, reads - defined


def _bytes_text(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


# Trial processes an API process runs at once (each may take the trial's memory limit); further
# uploads wait for a slot.
TRIAL_SLOTS = threading.BoundedSemaphore(2)


def _trial(path: Path, batch: int, input_shape: list[int], dtype: str) -> dict[str, Any]:
    """Each output's shape after one run on ``batch`` samples of zeros, in a separate process
    under the trial's limits; refuses a graph that does not finish, runs out of memory or
    fails."""
    settings = get_settings()
    timeout_s, memory_bytes = settings.teacher_trial_timeout_s, settings.teacher_trial_memory_bytes
    inference = f"a {batch}-sample inference"
    try:
        with TRIAL_SLOTS:
            return run_isolated(
                onnx_output_shapes,
                str(path),
                (batch, *input_shape),
                dtype,
                timeout_s=timeout_s,
                memory_bytes=memory_bytes,
            )
    except TrialTimeout as e:
        raise InvalidModel(
            f"The model did not finish {inference} within {timeout_s:g} s (a loop that never "
            "ends?).",
            field="file",
        ) from e
    except TrialOutOfMemory as e:
        raise InvalidModel(
            f"The model needed more than {_bytes_text(memory_bytes)} of memory for {inference}.",
            field="file",
        ) from e
    except TrialFailed as e:
        raise InvalidModel(
            f"The model failed on {inference} of zeros: {e.error_type}.", field="file"
        ) from e


class OnnxTeacher(TeacherBackend):
    def __init__(self, path: Path, signature: ModelSignature, device: torch.device) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.path, self.signature = path, signature
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.input_name, self.input_dtype, self.fixed_batch = onnx_input(self.session)

    def run(self, batch: ModelInputs, names: list[str] | None) -> list[np.ndarray]:
        assert isinstance(batch, np.ndarray)  # text ONNX teachers are not supported yet
        feed = {self.input_name: batch.astype(self.input_dtype, copy=False)}
        return list(self.session.run(names or [self.signature.scores.name], feed))

    def latency_ms(self, batch: int = 1) -> float:
        return onnx_latency_ms(self.path, self.signature, batch=batch)


class OnnxFormat:
    name = "onnx"

    def sniff(self, head: bytes, size: int) -> bool:
        return True  # protobuf has no magic bytes: ONNX is what is tried last

    def inspect(self, path: Path, filename: str, config: str | None) -> TeacherInfo:
        import onnx
        import onnxruntime as ort
        from onnx.external_data_helper import _get_all_tensors

        if config is not None:
            raise InvalidModel("`config` goes with a safetensors file, and this is not one.")
        try:
            model = onnx.load_model(str(path), load_external_data=False)
        except Exception as e:  # protobuf raises several types on corrupt bytes
            raise InvalidModel(explain_parse_error(filename), field="file") from e
        # Anywhere in the graph (initializers, node attributes, subgraphs): external data would
        # make onnxruntime read files beside the upload.
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(model)):
            raise InvalidModel(
                "ONNX models with external data files are not accepted; save it as one file "
                "(`torch.onnx.export(..., external_data=False)`, or "
                "`onnx.save(model, path, save_as_external_data=False)`).",
                field="file",
            )
        # Optimizations off: constant folding would run the graph's constant nodes right here.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise InvalidModel(explain_load_error(model, e, filename), field="file") from e
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1:
            raise InvalidModel(
                f"A teacher takes one input tensor; this model takes {len(inputs)}: "
                f"{[i.name for i in inputs]}."
            )
        if inputs[0].type not in ORT_TYPES:
            raise InvalidModel(
                f"The model's input must be float32, float16 or float64, not {inputs[0].type}."
            )
        input_shape = _static_dims(list(inputs[0].shape[1:]), "input")
        floats = [o for o in outputs if o.type in DATATYPES and len(o.name) <= 255]
        candidates = [o for o in floats if len(o.shape) == 2 and _fixed(o.shape[1:])]
        if not candidates:
            raise InvalidModel(
                "A teacher returns class scores: an output shaped [batch, classes] of floats; "
                f"this model's outputs are {[(o.name, o.type, o.shape) for o in outputs]}."
            )
        # Only what some node reads counts: an unused initializer is never loaded.
        parameters, _ = _used_parameters(model.graph)
        # Every output a job may read (any candidate scores, any feature layer) must come out
        # [batch, *declared] from the trial.
        read = [o for o in floats if len(o.shape) >= 2 and _fixed(o.shape[1:])]
        fixed_batch = inputs[0].shape[0] if inputs[0].shape else None
        batch = fixed_batch if isinstance(fixed_batch, int) and fixed_batch > 0 else 2
        dtype = np.dtype(ORT_TYPES[inputs[0].type]).name
        shapes = _trial(path, batch, input_shape, dtype)
        for o in read:
            got = shapes.get(o.name)
            if got != (batch, *o.shape[1:]):
                raise InvalidModel(
                    f"The model's output `{o.name}` is declared "
                    f"[batch, {', '.join(map(str, o.shape[1:]))}], but a {batch}-sample "
                    f"inference returned {'no tensor' if got is None else list(got)}.",
                    field="file",
                )
        signature = ModelSignature(
            inputs=[
                TensorSpec(
                    name=inputs[0].name[:255],
                    datatype=DATATYPES[inputs[0].type],
                    shape=list(input_shape),
                )
            ],
            outputs=[
                OutputSpec(name=o.name, datatype=DATATYPES[o.type], shape=[o.shape[1]])
                for o in candidates[:64]
            ],
        )
        return TeacherInfo(
            format=self.name,
            signature=signature,
            parameter_count=parameters,
            scores_choice=ScoresChoice(output=candidates[0].name, by="position"),
            # Intermediate tensors a feature method can match are the graph's float outputs
            # (the scores are taken out of them once chosen).
            feature_layers=[FeatureLayer(name=o.name, shape=list(o.shape[1:])) for o in read],
        )

    def open(
        self,
        path: Path,
        signature: ModelSignature,
        architecture: dict[str, Any] | None,
        device: torch.device,
    ) -> OnnxTeacher:
        return OnnxTeacher(path, signature, device)


ONNX = OnnxFormat()
