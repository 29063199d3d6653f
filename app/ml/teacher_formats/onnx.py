"""ONNX teachers: checked and run by onnxruntime, with no custom-op libraries ever registered.

The signature comes from the graph's one input (float32, float16 or float64: Distill casts what
it feeds) and its outputs: every ``[batch, N]`` float output can be the class scores (which one
is chosen by ``apply_declarations``); every float output but the scores is a feature layer.
A batch dimension the graph fixes (an export traced with one example) is honoured by running
batches of exactly that size.
"""

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.errors import InvalidModel
from app.ml.layers import FeatureLayer
from app.ml.onnx_io import ORT_TYPES, onnx_input, onnx_latency_ms
from app.ml.signature import MAX_RANK, Datatype, ModelSignature, OutputSpec, TensorSpec
from app.ml.teacher_formats.base import ScoresChoice, TeacherBackend, TeacherInfo
from app.ml.teacher_formats.onnx_errors import explain_load_error, explain_parse_error

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


class OnnxTeacher(TeacherBackend):
    def __init__(self, path: Path, signature: ModelSignature, device: torch.device) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.path, self.signature = path, signature
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.input_name, self.input_dtype, self.fixed_batch = onnx_input(self.session)

    def run(self, batch: np.ndarray, names: list[str] | None) -> list[np.ndarray]:
        feed = {self.input_name: batch.astype(self.input_dtype, copy=False)}
        return list(self.session.run(names or [self.signature.scores.name], feed))

    def latency_ms(self) -> float:
        return onnx_latency_ms(self.path, self.signature)


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
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
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
        # Weights are the floating-point initializers; integer ones are shapes and indices.
        float_types = {
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.BFLOAT16,
            onnx.TensorProto.DOUBLE,
        }
        parameters = sum(
            math.prod(t.dims) for t in model.graph.initializer if t.data_type in float_types
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
            feature_layers=[
                FeatureLayer(name=o.name, shape=list(o.shape[1:]))
                for o in floats
                if len(o.shape) >= 2 and _fixed(o.shape[1:])
            ],
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
